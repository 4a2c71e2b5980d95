"""Names FedJAX 0.0.17 calls that newer JAX removed, put back so it runs on jax 0.10.2.

For benchmarks only, run in FedJAX's own venv (never imported by fedjax-sim's runtime code).
FedJAX 0.0.17 pins jax 0.5.3, the last JAX with `jax.tree_map`; on jax 0.10.2 its Shakespeare
LSTM steps about 1.8x faster (`../shared/PERFORMANCE.md`), so the speed comparison runs it on
both. What FedJAX 0.0.17 (and the dm-haiku it imports) needs and jax 0.10.2 lacks:

* `jax.tree_map` (`fedjax/core/tree_util.py`, `regularizers.py`) -> `jax.tree_util.tree_map`;
  with it the other `jax.tree_*` aliases jax 0.6 removed (`tree_leaves`, `tree_flatten`,
  `tree_unflatten`, `tree_structure`, `tree_transpose`, `tree_reduce`, `tree_all`), which
  FedJAX's other modules (aggregators, tests) may reach;
* `jax.tree_util.tree_multimap` (older FedJAX and haiku code) -> `jax.tree_util.tree_map`;
* `jax.numpy.NINF` (`fedjax/models/shakespeare.py`, `stackoverflow.py`, `core/metrics.py`)
  -> `-math.inf`. FedJAX's own jax 0.5.3 lacks it too: its LSTM models fail there without it.

`apply()` only adds what is missing (on jax 0.5.3 `jax.numpy.NINF`, the one FedJAX needs
there, and three aliases it does not call). Call it before `import fedjax`.

Example:
  >>> from benchmarks import fedjax_shims
  >>> added = fedjax_shims.apply()
  >>> import jax
  >>> jax.tree_map(lambda a: a + 1, [1, 2])
  [2, 3]
"""

import math

TREE_NAMES = ("tree_map", "tree_leaves", "tree_flatten", "tree_unflatten", "tree_structure",
              "tree_transpose", "tree_reduce", "tree_all")
"""`jax.<name>` aliases of `jax.tree_util.<name>` that jax 0.6 removed."""


def apply() -> list[str]:
    """Puts back the JAX names FedJAX 0.0.17 needs that this JAX lacks.

    Returns:
      The names added: all ten on jax 0.10.2; on jax 0.5.3 `jax.tree_reduce`, `jax.tree_all`,
      `jax.tree_util.tree_multimap` and `jax.numpy.NINF`.

    Example:
      >>> sorted(apply())  # on jax 0.10.2 (a second call adds nothing)  # doctest: +SKIP
      ['jax.numpy.NINF', 'jax.tree_all', ..., 'jax.tree_util.tree_multimap']
    """
    import jax
    import jax.numpy as jnp
    import jax.tree_util as tu

    added = []
    for name in TREE_NAMES:
        if not hasattr(jax, name) and hasattr(tu, name):
            setattr(jax, name, getattr(tu, name))
            added.append(f"jax.{name}")
    if not hasattr(tu, "tree_multimap"):
        setattr(tu, "tree_multimap", tu.tree_map)
        added.append("jax.tree_util.tree_multimap")
    if not hasattr(jnp, "NINF"):
        setattr(jnp, "NINF", -math.inf)
        added.append("jax.numpy.NINF")
    return added
