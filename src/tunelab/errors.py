"""User-facing errors.

A `TunelabError` is a mistake the user can fix (a bad config key, a malformed data line, an unknown
model name). The CLI prints its message as one line and exits with status 2; it never shows a traceback
for these. Anything else that escapes is a bug in tunelab and keeps its traceback.
"""


class TunelabError(Exception):
    """A problem with the user's input, reported as one line."""


class ConfigError(TunelabError):
    """A config key is unknown or its value is invalid."""


class DataError(TunelabError):
    """A data file is malformed; the message names the file, the line and the field."""


class ModelError(TunelabError):
    """A model cannot be found or does not fit the task."""
