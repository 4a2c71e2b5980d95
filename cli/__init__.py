"""The `fedjax` command line (Typer): parses options, builds an Experiment, shows progress."""
