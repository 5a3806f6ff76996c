"""The one error type of data preparation: bad or unavailable input, named with its fix."""


class DataError(Exception):
    """Bad or unavailable input data; the message names the file and the fix."""
