"""benchmarks/stackoverflow_like.py writes Stack Overflow files our reader and task read;
benchmarks/scale.py's summaries and growth exponents."""

import json
import math

import numpy as np
import pytest

from benchmarks import scale
from benchmarks import stackoverflow_like as so_like
from fedjax_api import tasks
from fedjax_core.data.sqlite import SQLiteFederatedData


def test_sizes_follow_the_lognormal_of_the_real_mean():
    sizes = so_like.client_sizes(20_000, so_like.TRAIN_MEAN, seed=3)
    assert so_like.TRAIN_MEAN == pytest.approx(396.58, abs=0.01)
    assert sizes.mean() == pytest.approx(so_like.TRAIN_MEAN, rel=0.05)
    # log-normal, sigma 1: median = mean x exp(-1/2) = 0.607 x mean; heavy right tail
    assert np.median(sizes) / so_like.TRAIN_MEAN == pytest.approx(math.exp(-0.5), abs=0.04)
    assert np.log(sizes).std() == pytest.approx(1.0, abs=0.05)
    assert sizes.min() >= 1 and set(np.unique(sizes)) <= set(so_like.size_grid(sizes.max()))
    assert so_like.profile(342_477).test_clients == 204_088
    assert so_like.profile(1_000_000) == so_like.Profile(1_000_000, 595_917, 16.0, 4.0, 0.75)
    assert [so_like.parse_count(t) for t in ("10k", "342k", "1m")] == [10_000, 342_477, 10**6]


def test_generated_files_open_and_preprocess_to_x_y(tmp_path):
    population = so_like.Profile(40, 7, train_mean=12.0, test_mean=3.0, sigma=1.0)
    info = so_like.generate(tmp_path, population, pool_posts=1024)
    assert so_like.is_complete(tmp_path, population)
    assert not so_like.is_complete(tmp_path, population._replace(test_clients=8))
    with SQLiteFederatedData(tmp_path / "stackoverflow_train.sqlite") as train:
        assert len(train) == 40 and int(train.client_sizes.sum()) == info["train"]["examples"]
        assert train.client_ids[:2] == ("00000000", "00000001")
        c = train.get_client(0)
        assert list(c) == ["creation_date", "score", "tags", "title", "tokens", "type"]
        assert c["score"].dtype == np.int64 and len(c["tokens"]) == train.client_sizes[0]
        assert set(c["type"]) <= {b"question", b"answer"}
        assert c["creation_date"][0].endswith(b" UTC")
    words = (tmp_path / "stackoverflow.word_count").read_text().splitlines()
    assert len(words) == so_like.NUM_WORDS and words[0].split()[0] == "ba"
    assert json.loads((tmp_path / "manifest.json").read_text())["test"]["clients"] == 7
    t = tasks.get("stackoverflow", data_path=str(tmp_path))
    assert (t.train.num_clients, t.test.num_clients) == (40, 7)
    x = t.train.data.get_client(1)
    n = int(t.train.data.client_sizes[1])
    assert x["x"].shape == (n, 20) and x["y"].shape == (n, 20)
    assert (x["x"][:, 0] == 1).all() and x["y"].max() <= 10003
    y = x["y"][:, :-1]  # x is y shifted right after BOS, the EOS left out
    np.testing.assert_array_equal(x["x"][:, 1:], np.where(y == 2, 0, y))
    assert (x["y"] == 2).sum() > 0 and set(x["domain_id"]) <= {0, 1}


def test_run_summary_and_growth_exponents(tmp_path):
    records = [{"round": 0, "kind": "eval", "test/num_examples": 1000.0, "eval_time_s": 2.0},
               {"round": 1, "kind": "train", "round_time_s": 5.0, "wall_time_s": 7.0},
               {"round": 2, "kind": "train", "round_time_s": 1.0, "wall_time_s": 8.0},
               {"round": 3, "kind": "train", "round_time_s": 3.0, "wall_time_s": 11.0}]
    stats = {"arrivals": [9.0, 10.0, 11.0, 14.0], "host": {"host_s": 0.03},
             "vm_hwm_bytes": 2**30, "rchar": 5000, "exit_code": 0}
    (tmp_path / "client_store").mkdir()
    (tmp_path / "client_store" / "rows.bin").write_bytes(b"\0" * 100)
    s = scale.summarize_run(records, stats, tmp_path, 3)
    assert (s["first_round_s"], s["round_s_median"], s["startup_s"]) == (5.0, 2.0, 3.0)
    assert s["host_ms_per_round"] == pytest.approx(10.0)
    assert s["eval_examples_per_s"] == 500.0 and s["store_bytes"] == 100
    assert scale.log_log_slope([1e4, 1e5, 1e6], [2.0, 20.0, 200.0]) == 1.0
    assert scale.log_log_slope([1e4], [2.0]) is None
    sizes = {label: {"clients": c, "small": False, "task": "stackoverflow",
                     "open": {"open_first_bytes": 10 * c}, "runs": {"fedavg": {"round_s_median": 1.0}}}
             for label, c in (("10k", 10_000), ("100k", 100_000))}
    fits = scale.exponents(sizes)
    assert fits["open (real)"]["open_first_bytes"] == 1.0
    assert fits["stackoverflow/fedavg"]["round_s_median"] == 0.0
