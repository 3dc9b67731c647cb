"""The one exception type of data_prep: bad input or bad output state, reported to the user without a traceback."""


class DataError(Exception):
    """A problem with the user's data or directories. The message names the file (and line) and how to fix it;
    the CLI prints it as `error: <message>` and exits 2."""
