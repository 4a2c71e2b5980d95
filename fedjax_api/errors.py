"""The one error type for a user's mistake: the CLI prints its message and exits 2."""


class ConfigError(ValueError):
    """Bad input from the user (option, config, path). Its message is one line that
    names the problem and the fix."""
