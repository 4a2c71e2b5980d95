"""Aggregation is exact f32 on every backend: each dot in an aggregator's lowered HLO
carries HIGHEST precision (or there is no dot), even under a bf16 default matmul precision.

XLA:CPU ignores precision settings, so the values cannot show it here; the lowered program
does (`stablehlo.dot_general ..., precision = [HIGHEST, HIGHEST]`)."""

import re

import jax
import jax.numpy as jnp
import pytest

from fedjax_core import client_state, tree
from fedjax_core.aggregate import registry
from tests.fedjax_core.helpers import Rows

# Options that let `apply` run without a round around it (a 4-client cohort).
OPTIONS = {"dp_adaptive": {"clip_count_stddev": 1.0}}
VARIANTS = [(name, OPTIONS.get(name, {})) for name in registry.AGGREGATORS] + [
    ("drive", {"rotation": "uniform"}), ("attack", {"persistent": True, "kind": "random"})]

DOT = re.compile(r"stablehlo\.dot_general[^\n]*")


def dots(lowered_text: str) -> list[str]:
    return DOT.findall(lowered_text)


def inexact(lowered_text: str) -> list[str]:
    """The dot_general lines that do not carry HIGHEST precision on both operands."""
    return [d for d in dots(lowered_text) if "precision = [HIGHEST, HIGHEST]" not in d]


PARAMS = {"w": jnp.ones((3, 2)), "b": jnp.ones(2)}
DELTAS = {"w": jnp.arange(24.0).reshape(4, 3, 2) / 10, "b": jnp.arange(8.0).reshape(4, 2) / 10}
WEIGHTS = jnp.array([1.0, 2.0, 0.0, 3.0])


def lowered_apply(name: str, options: dict) -> str:
    agg = registry.build(name, **options)
    state = agg.init(PARAMS)
    slots = None
    if client_state.has_stores(state):
        state, slots = Rows().prepare(state, [0, 1, 2, 3])
    fn = lambda d, w, s, k: agg.apply(d, w, s, k, slots)  # noqa: E731
    with jax.default_matmul_precision("bfloat16"):
        return jax.jit(fn).lower(DELTAS, WEIGHTS, state, jax.random.key(0)).as_text()


def lowered_stream(name: str, options: dict) -> str | None:
    agg = registry.build(name, **options)
    if agg.stream is None:
        return None

    def fn(d, w, s, k):
        parts = jax.vmap(agg.stream.contribution)(d, w)
        total = jax.tree.map(lambda x: jnp.sum(x, axis=0), parts)
        return agg.stream.finalize(total, PARAMS, s, k)

    with jax.default_matmul_precision("bfloat16"):
        return jax.jit(fn).lower(DELTAS, WEIGHTS, agg.init(PARAMS), jax.random.key(0)).as_text()


@pytest.mark.parametrize("name,options", VARIANTS, ids=[f"{n}{o or ''}" for n, o in VARIANTS])
def test_every_dot_in_an_aggregator_is_highest_precision(name, options):
    assert inexact(lowered_apply(name, options)) == []
    stream = lowered_stream(name, options)
    if stream is not None:
        assert inexact(stream) == []


def test_the_dots_are_there_and_exact():
    # Not vacuous: the mean and DRIVE's uniform rotation do lower to dots, all HIGHEST.
    assert len(dots(lowered_apply("mean", {}))) == 2  # one per leaf
    assert len(dots(lowered_apply("drive", {"rotation": "uniform"}))) >= 2
    # and a dot without an explicit precision follows the bf16 default, which is flagged.
    with jax.default_matmul_precision("bfloat16"):
        plain = jax.jit(lambda w, x: jnp.tensordot(w, x, axes=1)).lower(
            WEIGHTS, DELTAS["b"]).as_text()
    assert len(inexact(plain)) == 1


def test_weighted_mean_value_unchanged_by_precision():
    # CPU computes f32 either way: the exact mean, 2.5 = (1*1 + 3*3) / 4.
    out = tree.weighted_mean(jnp.array([[1.0], [3.0]]), jnp.array([1.0, 3.0]))
    assert float(out[0]) == 2.5
