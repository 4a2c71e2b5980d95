"""Aggregators: how a server combines its cohort's updates, one module per family
(`fedjax_core.aggregate.robust`, `.privacy`, `.compression`, ...); `registry` lists them
by name.

Convention (as optax's): importing `fedjax_core.aggregate.X` always gives the module;
the factories (`mean`, `krum`, `gaussian`, ...) are exported flat from `fedjax_core`.
"""
