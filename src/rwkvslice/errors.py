"""User-facing errors.

Anything a user can cause (a bad file, a bad flag, a broken checkpoint) raises a subclass of
`RWKVSliceError` with a one-line message that names the file, line or argument. The CLI prints
`rwkvslice: error: <message>` and exits with status 2; it never shows a traceback for these.
"""


class RWKVSliceError(Exception):
    """Base class of every error caused by user input."""


class CheckpointError(RWKVSliceError):
    """A checkpoint file is missing, truncated, unsafe or has the wrong keys/shapes."""


class DataError(RWKVSliceError):
    """A data file is missing or malformed. The message starts with FILE or FILE:LINE."""


class ConfigError(RWKVSliceError):
    """An invalid argument, flag value or model configuration."""
