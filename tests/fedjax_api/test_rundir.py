"""fedjax_api.rundir: metrics.jsonl, the CSV mirrors, TensorBoard events, torn lines, resume."""

import csv
import json
import math
import struct
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedjax_api import rundir
from fedjax_api.errors import ConfigError
from fedjax_api.rundir import METRICS_FILE, MetricsLog, read_metrics

NAN, INF = float("nan"), float("inf")


def write_all(run_dir, records, **kwargs):
    with MetricsLog(run_dir, **kwargs) as log:
        for r in records:
            log.write(r)


def same(a, b) -> bool:
    """Equal, NaN equal to NaN."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b and type(a) is type(b)


def same_records(got, want) -> bool:
    return len(got) == len(want) and all(
        g.keys() == w.keys() and all(same(g[k], w[k]) for k in w) for g, w in zip(got, want))


def test_csv_files_hold_each_kind_with_exact_text(tmp_path):
    write_all(tmp_path, [
        {"round": 1, "kind": "train", "train/loss": 2.5, "round_time_s": 0.25},
        {"round": 2, "kind": "train", "train/loss": np.float32(1.5), "round_time_s": 0.125},
        {"round": 2, "kind": "eval", "test/accuracy": 0.1, "test/num_examples": 40,
         "eval_time_s": 1e-05},
    ])
    assert (tmp_path / "train.csv").read_text() == (
        "round,train/loss,round_time_s\n"
        "1,2.5,0.25\n"
        "2,1.5,0.125\n")
    assert (tmp_path / "eval.csv").read_text() == (
        "round,test/accuracy,test/num_examples,eval_time_s\n"
        "2,0.1,40,1e-05\n")
    assert [r["round"] for r in read_metrics(tmp_path)] == [1, 2, 2]


def test_a_new_column_rewrites_the_csv_with_the_wider_header(tmp_path):
    log = MetricsLog(tmp_path)
    log.write({"round": 0, "kind": "eval", "test/accuracy": 0.25, "eval_time_s": 2.0})
    log.write({"round": 1, "kind": "train", "train/loss": 3.0})
    log.write({"round": 1, "kind": "eval", "test/accuracy": 0.5, "train/accuracy": 0.75,
               "eval_time_s": 1.0})
    log.write({"round": 2, "kind": "train", "train/loss": 2.0, "privacy/epsilon": 0.5})
    log.write({"round": 2, "kind": "eval", "test/accuracy": 0.625})  # fewer columns
    assert (tmp_path / "eval.csv").read_text() == (
        "round,test/accuracy,eval_time_s,train/accuracy\n"
        "0,0.25,2.0,\n"
        "1,0.5,1.0,0.75\n"
        "2,0.625,,\n")
    assert (tmp_path / "train.csv").read_text() == (
        "round,train/loss,privacy/epsilon\n"
        "1,3.0,\n"
        "2,2.0,0.5\n")
    log.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.csv", METRICS_FILE,
                                                         "train.csv"]  # no temporary left


def test_nan_and_inf_are_written_as_words_and_read_back_as_floats(tmp_path):
    write_all(tmp_path, [{"round": 1, "kind": "train", "train/loss": NAN,
                          "a": INF, "b": -INF, "c": np.float64(NAN)}])
    assert (tmp_path / "train.csv").read_text() == "round,train/loss,a,b,c\n1,nan,inf,-inf,nan\n"
    line = (tmp_path / METRICS_FILE).read_text()
    assert json.loads(line) == {"round": 1, "kind": "train", "train/loss": "nan", "a": "inf",
                                "b": "-inf", "c": "nan"}
    (record,) = read_metrics(tmp_path)
    assert math.isnan(record["train/loss"]) and math.isnan(record["c"])
    assert record["a"] == INF and record["b"] == -INF and record["kind"] == "train"


# --- TensorBoard ---------------------------------------------------------------------------

def read_events(path: Path) -> list:
    """The Event protos of one TFRecord event file, each record's CRCs checked."""
    from tensorboardX.crc32c import crc32c
    from tensorboardX.proto.event_pb2 import Event

    def masked(data: bytes) -> int:
        crc = crc32c(data)
        return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    data, pos, events = path.read_bytes(), 0, []
    while pos < len(data):
        header = data[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", data[pos + 8:pos + 12])
        body = data[pos + 12:pos + 12 + length]
        (body_crc,) = struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])
        assert header_crc == masked(header) and body_crc == masked(body)
        events.append(Event.FromString(body))
        pos += 16 + length
    return events


def scalars(run_dir: Path, kind: str) -> dict:
    """{(tag, step): value} of every scalar in `run_dir/tb/kind`, files in name order."""
    out = {}
    for file in sorted((run_dir / "tb" / kind).glob("events.out.tfevents.*")):
        for event in read_events(file):
            for value in event.summary.value:
                out[value.tag, event.step] = value.simple_value
    return out


def test_tensorboard_scalars_read_back(tmp_path):
    pytest.importorskip("tensorboardX")
    write_all(tmp_path, [
        {"round": 0, "kind": "eval", "test/accuracy": 0.125, "eval_time_s": 0.5},
        {"round": 1, "kind": "train", "train/loss": 2.25, "round_time_s": 0.75,
         "train/num_examples": np.float32(12)},
        {"round": 2, "kind": "train", "train/loss": 1.5, "round_time_s": 0.5, "note": "x"},
        {"round": 2, "kind": "eval", "test/accuracy": 0.5, "train/loss": 1.75, "x": NAN},
    ], tensorboard=True)
    assert scalars(tmp_path, "train") == {
        ("train/loss", 1): 2.25, ("round_time_s", 1): 0.75, ("train/num_examples", 1): 12.0,
        ("train/loss", 2): 1.5, ("round_time_s", 2): 0.5}
    evals = scalars(tmp_path, "eval")
    assert math.isnan(evals.pop(("x", 2)))
    assert evals == {("test/accuracy", 0): 0.125, ("eval_time_s", 0): 0.5,
                     ("test/accuracy", 2): 0.5, ("train/loss", 2): 1.75}


def test_tensorboard_resume_purges_the_later_steps(tmp_path):
    pytest.importorskip("tensorboardX")
    write_all(tmp_path, [{"round": r, "kind": "train", "train/loss": float(r)}
                         for r in (1, 2, 3)], tensorboard=True)
    write_all(tmp_path, [{"round": 3, "kind": "train", "train/loss": 30.0}],
              tensorboard=True, truncate_after_round=2)
    _, second = sorted((tmp_path / "tb" / "train").glob("events.out.tfevents.*"))
    starts = [e.step for e in read_events(second) if e.HasField("session_log")]
    assert starts == [3]  # TensorBoard hides the first file's steps >= 3
    assert scalars(tmp_path, "train")[("train/loss", 3)] == 30.0


def test_tensorboard_without_tensorboardx_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import fails
    with pytest.raises(ConfigError) as e:
        MetricsLog(tmp_path, tensorboard=True)
    assert str(e.value) == ("TensorBoard logging needs the tensorboard extra: "
                            "pip install 'fedjax-sim[tensorboard]'")
    assert not list(tmp_path.iterdir())  # failed before writing anything


# --- torn lines and resume -----------------------------------------------------------------

def test_a_torn_last_line_is_ignored_and_cut_before_appending(tmp_path):
    write_all(tmp_path, [{"round": r, "kind": "train", "train/loss": 1.0} for r in (1, 2)])
    with open(tmp_path / METRICS_FILE, "a") as f:
        f.write('{"round": 3, "kind": "tr')  # a crash mid-write
    assert [r["round"] for r in read_metrics(tmp_path)] == [1, 2]
    write_all(tmp_path, [{"round": 3, "kind": "train", "train/loss": 0.5}])
    assert [r["round"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    assert (tmp_path / "train.csv").read_text() == (
        "round,train/loss\n1,1.0\n2,1.0\n3,0.5\n")


def test_a_whole_last_line_without_its_newline_is_kept(tmp_path):
    (tmp_path / METRICS_FILE).write_text('{"round": 1, "kind": "train", "train/loss": 1.5}')
    write_all(tmp_path, [{"round": 2, "kind": "train", "train/loss": 0.5}])
    assert [r["train/loss"] for r in read_metrics(tmp_path)] == [1.5, 0.5]
    assert (tmp_path / "train.csv").read_text() == "round,train/loss\n1,1.5\n2,0.5\n"


def test_a_bad_line_in_the_middle_is_an_error_naming_file_and_line(tmp_path):
    (tmp_path / METRICS_FILE).write_text(
        '{"round": 1, "kind": "train"}\n\n{"round": 2, oops\n{"round": 3, "kind": "train"}\n')
    with pytest.raises(ConfigError) as e:
        read_metrics(tmp_path)
    message = str(e.value)
    assert f"{str(tmp_path / METRICS_FILE)!r} line 3 is not a JSON record" in message
    assert "\n" not in message
    (tmp_path / METRICS_FILE).write_text('[1, 2]\n{"round": 3, "kind": "train"}\n')
    with pytest.raises(ConfigError, match="line 1 is not a JSON record"):
        read_metrics(tmp_path)
    with pytest.raises(ConfigError, match="line 1 is not a JSON record"):
        MetricsLog(tmp_path)  # nothing appended to a broken log


def test_missing_metrics_is_a_one_line_error(tmp_path):
    with pytest.raises(ConfigError, match=r"no metrics\.jsonl in .*: not a fedjax run directory"):
        read_metrics(tmp_path)


def test_truncate_after_round_drops_the_later_records_everywhere(tmp_path):
    first = []
    for r in range(1, 6):
        first.append({"round": r, "kind": "train", "train/loss": 1.0 / r})
        if r % 2 == 0:
            first.append({"round": r, "kind": "eval", "test/accuracy": r / 10,
                          **({"train/accuracy": 0.9} if r == 4 else {})})
    write_all(tmp_path, first)
    resumed = [{"round": 3, "kind": "train", "train/loss": 7.0},
               {"round": 4, "kind": "train", "train/loss": 8.0}]
    write_all(tmp_path, resumed, truncate_after_round=2)
    records = read_metrics(tmp_path)
    assert same_records(records, first[:3] + resumed)
    assert [(r["kind"], r["round"]) for r in records] == [
        ("train", 1), ("train", 2), ("eval", 2), ("train", 3), ("train", 4)]
    # The CSVs hold the kept records only; the wider eval header of round 4 is gone.
    assert (tmp_path / "eval.csv").read_text() == "round,test/accuracy\n2,0.2\n"
    assert (tmp_path / "train.csv").read_text() == (
        "round,train/loss\n1,1.0\n2,0.5\n3,7.0\n4,8.0\n")
    write_all(tmp_path, [], truncate_after_round=0)
    assert read_metrics(tmp_path) == []
    assert not (tmp_path / "train.csv").exists() and not (tmp_path / "eval.csv").exists()
    assert not list(tmp_path.glob(".*tmp"))


def test_existing_api_still_works(tmp_path):
    target = rundir.check_writable_dir(tmp_path / "a" / "b")
    rundir.write_json_atomic(target / rundir.CONFIG_FILE, {"b": 1, "a": [1, 2]})
    assert json.loads((target / "config.json").read_text()) == {"a": [1, 2], "b": 1}
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="cannot write to output directory"):
        rundir.check_writable_dir(tmp_path / "file" / "x")


# --- property: every log holds exactly the records written --------------------------------

CASES = {"n": 0}
values = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=64),
                   st.integers(-10**6, 10**6))
metric_names = st.sampled_from(["train/loss", "test/accuracy", "a", "b/c", "round_time_s"])
records_strategy = st.lists(st.tuples(st.sampled_from(["train", "eval"]),
                                      st.dictionaries(metric_names, values, max_size=4)),
                            max_size=12)


def parse_csv(path: Path, kind_records: list[dict]) -> None:
    """Checks the CSV at `path` holds `kind_records` exactly (empty cells for missing)."""
    if not kind_records:
        assert not path.exists()
        return
    with open(path, newline="") as f:
        header, *rows = list(csv.reader(f))
    want_cols = list(dict.fromkeys(["round"] + [k for r in kind_records for k in r
                                                if k != "kind"]))
    assert header == want_cols
    assert len(rows) == len(kind_records)
    for row, record in zip(rows, kind_records):
        for col, cell in zip(header, row):
            if col not in record:
                assert cell == ""
            else:
                value = record[col]
                parsed = int(cell) if isinstance(value, int) else float(cell)
                assert same(parsed, value)


@settings(max_examples=60, deadline=None)
@given(records_strategy, st.integers(0, 12), records_strategy)
def test_logs_hold_exactly_the_records_written(first, cut, second):
    CASES["n"] += 1
    def as_records(pairs, start):
        return [{"round": start + i, "kind": kind, **metrics}
                for i, (kind, metrics) in enumerate(pairs)]

    first, second = as_records(first, 1), as_records(second, cut + 1)
    with tempfile.TemporaryDirectory() as d:
        run_dir = Path(d)
        write_all(run_dir, first)
        write_all(run_dir, second, truncate_after_round=cut)
        want = [r for r in first if r["round"] <= cut] + second
        assert same_records(read_metrics(run_dir), want)
        for kind in ("train", "eval"):
            parse_csv(run_dir / f"{kind}.csv", [r for r in want if r["kind"] == kind])


def test_property_ran():
    assert CASES["n"] in (0, 60)  # 0 when run on its own
    print(f"hypothesis cases run: {CASES['n']}")
