"""`fedjax_api.sweep.Sweep` on the synthetic task: each member equals its own Experiment."""

import json
import math

import attrs
import numpy as np
import pytest

from fedjax_api import config, configfile, rundir
from fedjax_api.errors import ConfigError
from fedjax_api.experiment import Experiment
from fedjax_api.sweep import Member, Sweep

TINY = dict(rounds=2, clients_per_round=3, epochs=1, eval_train_clients=3)


def separate(sweep: Sweep, k: int):
    """Member k run alone, as `fedjax run` would run its config."""
    return Experiment.from_config(attrs.evolve(sweep.member_config(k), out=None)).run()


def assert_same_records(got: list[dict], want: list[dict]):
    assert [(r["round"], r["kind"]) for r in got] == [(r["round"], r["kind"]) for r in want]
    for g, w in zip(got, want):
        keys = {k for k in w if not k.endswith("_time_s")}
        assert keys == {k for k in g if not k.endswith("_time_s")}
        for key in keys - {"round", "kind"}:
            assert math.isclose(g[key], w[key], rel_tol=1e-5, abs_tol=1e-5), (key, g, w)


def test_members_equal_separate_experiments_and_the_run_dir(tmp_path):
    cfg = config.resolve("synthetic", **TINY)
    sweep = Sweep.grid(cfg, client_lr=[0.01, 0.05], seeds=[0, 1], out_dir=tmp_path / "sw")
    assert [m.label for m in sweep.members] == [
        "client_lr=0.01 server_lr=1 seed=0", "client_lr=0.01 server_lr=1 seed=1",
        "client_lr=0.05 server_lr=1 seed=0", "client_lr=0.05 server_lr=1 seed=1"]
    assert sweep.swept() == ["client_lr"]
    seen = []
    result = sweep.run(on_record=seen.append)
    assert len(seen) == 4 * (2 + 1) and {r["member"] for r in seen} == {0, 1, 2, 3}
    for k in range(4):
        want = separate(sweep, k)
        got = result.members[k]
        assert_same_records(got.history, want.history)
        assert got.final["test"].keys() == want.final["test"].keys()
        assert got.diverged_round is None
    accs = [m.final["test"]["accuracy"] for m in result.members]
    assert len(set(accs)) > 1  # the members differ

    out = tmp_path / "sw"
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["status"] == "complete" and summary["swept"] == ["client_lr"]
    assert summary["ranked_by"] == "test/accuracy"
    ranked = result.ranked()
    assert [m["rank"] for m in sorted(summary["members"], key=lambda m: m["rank"])] == [1, 2, 3, 4]
    best = min(summary["members"], key=lambda m: m["rank"])
    assert best["label"] == ranked[0].member.label
    assert best["final"]["test/accuracy"] == max(accs)
    rows = (out / "summary.csv").read_text().splitlines()
    assert rows[0].startswith("rank,index,client_lr,server_lr,seed,diverged_round,")
    assert len(rows) == 5 and rows[1].startswith(f"1,{best['index']},")
    for k, m in enumerate(summary["members"]):
        member_dir = out / m["dir"]
        assert rundir.read_metrics(member_dir) == json.loads(json.dumps(
            result.members[k].history))
        cfg_k = configfile.resolve_file(member_dir / "config.toml")
        assert attrs.evolve(cfg_k, out=None) == attrs.evolve(sweep.member_config(k), out=None)
    with pytest.raises(ConfigError, match="already holds a sweep"):
        Sweep.grid(cfg, client_lr=[0.01, 0.05], out_dir=out)


def test_fedadam_poisson_host_packed_with_evaluations_equals_experiments():
    cfg = config.resolve("synthetic", algorithm="fedadam", sampling="poisson", eval_every=1,
                         **TINY)
    sweep = Sweep(config=cfg, examples_on_device=False, members=[
        Member(client_lr=0.02, server_lr=0.01, seed=0),
        Member(client_lr=0.02, server_lr=0.03, seed=0),
        Member(client_lr=0.05, server_lr=0.02, seed=3)])
    assert sweep.swept() == ["client_lr", "server_lr"]
    result = sweep.run()
    for k in range(3):
        assert_same_records(result.members[k].history, separate(sweep, k).history)


def test_a_diverging_member_does_not_stop_the_others():
    cfg = config.resolve("synthetic", **TINY)
    result = Sweep.grid(cfg, client_lr=[0.01, 1e38]).run()
    ok, bad = result.members
    assert ok.diverged_round is None and math.isfinite(ok.final["test"]["loss"])
    assert bad.diverged_round == 1 and math.isnan(bad.final["test"]["loss"])
    assert result.ranked("test/loss")[0] is ok and result.ranked("test/loss")[-1] is bad


def test_algorithm_options_can_be_swept():
    cfg = config.resolve("synthetic", algorithm="fedavgm", **TINY)
    sweep = Sweep.grid(cfg, options={"momentum": [0.0, 0.9]})
    assert [m.label for m in sweep.members] == [
        "client_lr=0.01 server_lr=1 momentum=0 seed=0",
        "client_lr=0.01 server_lr=1 momentum=0.9 seed=0"]
    result = sweep.run()
    want = separate(sweep, 1)
    assert np.isclose(result.members[1].final["test"]["loss"], want.final["test"]["loss"],
                      rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options, grid, message", [
    (dict(algorithm="fednova"), dict(client_lr=[0.01, 0.1]),
     "algorithm 'fednova': cannot sweep 'client_lr'"),
    (dict(algorithm="hypcluster"), dict(options={"num_clusters": [2, 3]}),
     "algorithm 'hypcluster': cannot sweep 'num_clusters': .*shape"),
    (dict(algorithm="scaffold"), dict(client_lr=[0.01, 0.1]), "keeps state per client"),
])
def test_what_cannot_be_swept_is_refused_in_one_line(options, grid, message):
    sweep = Sweep.grid(config.resolve("synthetic", **{**TINY, **options}), **grid)
    with pytest.raises(ConfigError, match=message) as e:
        sweep.run()
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("options, grid, message", [
    (dict(noise_multiplier=1.0, clip=1.0, dp_delta=1e-3), dict(seeds=[0, 1]), "private"),
    ({}, dict(client_lr=[0.01, 0.01]), "given twice"),
    ({}, dict(client_lr=[0.01, -1.0]), "member client_lr=-1 .*client-lr must be"),
    ({}, dict(options={"b2": [0.9, 0.99]}), "has no option 'b2'"),
    (dict(algorithm="fedbuff"), dict(options={"delay": ["uniform", "exponential"]}),
     "not numbers"),
    ({}, dict(seeds=[]), "--seeds needs at least one value"),
])
def test_bad_sweeps_are_refused_before_running(options, grid, message):
    cfg = config.resolve("synthetic", **{**TINY, **options})
    with pytest.raises(ConfigError, match=message):
        Sweep.grid(cfg, **grid)
