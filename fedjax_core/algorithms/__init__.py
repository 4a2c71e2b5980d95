"""Federated algorithms, one module each (`fedjax_core.algorithms.scaffold`, ...);
`registry` lists them by name.

Convention (as optax's): a subpackage holds modules, and importing
`fedjax_core.algorithms.X` always gives the module, whose helpers stay reachable. The
algorithm factories themselves are exported flat from `fedjax_core`
(`fedjax_core.scaffold`, `fedjax_core.fedavg`, ...).
"""
