"""User-facing errors.

Every problem a user can fix (a bad config key, a missing file, a malformed data row) is raised as a
`MemtuneError` whose message names the file, line or field and what was expected. The CLI prints the
message on one line and exits non-zero; it never shows a traceback for these.
"""

from __future__ import annotations


class MemtuneError(Exception):
    """A problem with the user's input, reported without a traceback."""


class ConfigError(MemtuneError):
    """A recipe key is unknown, has the wrong type, or a combination of keys cannot work."""


class DataError(MemtuneError):
    """A data file is missing, unreadable, malformed, or empty."""


class ModelError(MemtuneError):
    """A model cannot be loaded, or an adapter does not fit the model."""
