"""fedjax_core: the functional layer of fedjax-sim (pure functions and typed pytrees).

Import the pieces from their modules: `fedjax_core.algorithms`, `fedjax_core.client`,
`fedjax_core.data`, `fedjax_core.models`, `fedjax_core.parallel`, `fedjax_core.evaluate`.
"""

__version__ = "0.1.0"
