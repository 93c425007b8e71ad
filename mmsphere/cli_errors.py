"""What every command shares at its seam: bad input is one line on stderr and exit code 2, never a traceback.

Arguments are parsed with :class:`ArgumentParser`, whose errors are :class:`ConfigError`; the
command body runs under :func:`run_cli`, which reports any :class:`MmsphereError` as
``<prog>: error: <message>``. Other exceptions are bugs and keep their traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from mmsphere.errors import ConfigError, MmsphereError

USAGE_ERROR = 2  # argparse's exit code for bad arguments, used for every kind of bad input


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors raise :class:`ConfigError` instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{message} (see {self.prog} --help)")


def run_cli(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
            body: Callable[[argparse.Namespace], int | None]) -> int:
    """Parse ``argv`` and return ``body(args)``; bad input is reported as one line and exit code 2."""
    try:
        return int(body(parser.parse_args(argv)) or 0)
    except MmsphereError as error:
        print(f"{parser.prog}: error: {one_line(str(error))}", file=sys.stderr)
        return USAGE_ERROR


def one_line(message: str) -> str:
    """``message`` on one line: a YAML parser's or a library's multi-line message joined with ' | '."""
    return " | ".join(line.strip() for line in message.splitlines() if line.strip()) or "(no message)"


def positive_int(text: str) -> int:
    """An argparse ``type``: an integer >= 1."""
    return _bounded(text, int, "an integer >= 1", lambda value: value >= 1)


def non_negative_int(text: str) -> int:
    """An argparse ``type``: an integer >= 0."""
    return _bounded(text, int, "an integer >= 0", lambda value: value >= 0)


def positive_float(text: str) -> float:
    """An argparse ``type``: a finite number > 0."""
    return _bounded(text, float, "a finite number > 0", lambda value: 0 < value < float("inf"))


def _bounded(text: str, kind: type, wanted: str, valid: Callable) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {wanted}") from None
    if not valid(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not {wanted}")
    return value
