"""The FedJAX comparison's pieces that need no FedJAX venv: shims, medians, ratios, checks."""

import jax
import jax.numpy as jnp
import jax.tree_util as tu
import pytest

from benchmarks import fedjax_shims
from benchmarks.fedjax_shakespeare_speed import round_summary
from benchmarks.shakespeare_vs_fedjax import check_same_examples, compare


def test_shims_put_back_what_fedjax_calls_and_only_that():
    added = fedjax_shims.apply()
    try:
        # vars(): the names exist only after apply(), as FedJAX's code reaches them.
        assert vars(jax)["tree_map"](lambda a, b: a - b, {"w": 3.0}, {"w": 1.0}) == {"w": 2.0}
        assert vars(tu)["tree_multimap"](lambda a: 2 * a, [1, 2]) == [2, 4]
        assert vars(jnp)["NINF"] == float("-inf")
        assert fedjax_shims.apply() == []  # nothing missing any more
    finally:
        for name in added:
            module, attr = name.rsplit(".", 1)
            delattr({"jax": jax, "jax.numpy": jnp, "jax.tree_util": tu}[module], attr)
    assert not hasattr(jax, "tree_map")  # jax 0.10.2 lacks it again after the cleanup


def test_round_summary_medians():
    rows = [{"s": 2.0, "examples": 100, "steps": 25}, {"s": 1.0, "examples": 200, "steps": 50},
            {"s": 6.0, "examples": 300, "steps": 75}]
    out = round_summary(rows)
    assert out["median_ms_per_example"] == 20.0  # of 20, 5, 20
    assert out["median_round_s"] == 2.0
    assert out["median_ms_per_step"] == 80.0
    assert out["total_ms_per_example"] == pytest.approx(1e3 * 9.0 / 600)
    with pytest.raises(ValueError, match="no timed rounds"):
        round_summary([])


def test_ratio_against_the_fastest_fedjax_and_same_examples():
    ours = {"median_ms_per_example": 4.0, "rounds": [{"round": 0, "examples": 249}]}
    runs = [{"jax": "0.5.3", "median_ms_per_example": 102.0, "shims": []},
            {"jax": "0.10.2", "median_ms_per_example": 40.0, "shims": ["jax.tree_map"]}]
    out = compare(ours, runs)
    assert [f["ratio"] for f in out["fedjax"]] == [25.5, 10.0]
    assert out["fastest_fedjax_jax"] == "0.10.2" and out["ratio_vs_fastest_fedjax"] == 10.0
    assert [f["shims"] for f in out["fedjax"]] == [False, True]
    check_same_examples(ours, {"rounds": [{"round": 0, "examples": 249}]})
    with pytest.raises(ValueError, match="different examples per round"):
        check_same_examples(ours, {"rounds": [{"round": 0, "examples": 248}]})
