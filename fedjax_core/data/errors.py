"""Errors raised when a dataset file on disk cannot be read."""


class DataFormatError(ValueError):
    """A dataset file is not in the expected format (wrong kind of file, truncated, corrupt).

    The message is one line: the file, what is wrong with it, and what to do about it, so that
    a command-line tool can print it as it is.
    """
