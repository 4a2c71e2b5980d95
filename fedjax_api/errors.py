"""The one error type for a user's mistake: the CLI prints its message and exits 2."""


class ConfigError(ValueError):
    """Bad input from the user (option, config, path). Its message is one line that
    names the problem and the fix."""


def unknown(kind: str, name: str, choices) -> ConfigError:
    """`unknown KIND 'name'; did you mean 'closest'? choose one of: a, b, c` as a ConfigError.

    Example:
      >>> raise unknown("algorithm", "fedsgdx", ["fedavg", "fedsgd"])
    """
    import difflib

    choices = sorted(choices)
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    hint = f" did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown {kind} {name!r};{hint} choose one of: {', '.join(choices)}")
