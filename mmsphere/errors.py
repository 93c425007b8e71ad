"""The exceptions mmsphere raises for bad user input: one small family, raised where the input enters.

Every command maps :class:`MmsphereError` to one line on stderr and exit code 2 (see
:mod:`mmsphere.cli_errors`); any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class MmsphereError(Exception):
    """Base class of the errors mmsphere raises for bad user input."""


class ConfigError(MmsphereError, ValueError):
    """A configuration key or command-line argument is unknown, mistyped or holds an impossible value."""


class DataError(MmsphereError, FileNotFoundError, ValueError):
    """An input file (shards, a sample list, a run directory, a checkpoint) is missing, empty or unreadable.

    Also a ``FileNotFoundError`` and a ``ValueError``, so callers that caught those from the readers
    (a missing file, a shard pattern that names nothing) keep working.
    """
