"""What every command shares at its seam: bad input is one line on stderr and exit code 2, never a traceback.

Arguments are parsed with :class:`ArgumentParser`, whose errors are :class:`ConfigError`; the
command body runs under :func:`run_cli`, which reports any :class:`MmsphereError` as
``<prog>: error: <message>``. Other exceptions are bugs and keep their traceback.

Under a launcher that starts the command in several processes (``accelerate launch``, ``torchrun``),
the line is printed once (:func:`report_error`), and the launcher's own report of the failed process
names it too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import NoReturn

from mmsphere.console import process_rank
from mmsphere.errors import ConfigError, MmsphereError

USAGE_ERROR = 2  # argparse's exit code for bad arguments, used for every kind of bad input
# how long a process other than 0 waits before printing its error (see report_error)
OTHER_PROCESS_GRACE_S = 10.0


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
        report_error(f"{parser.prog}: error: {one_line(str(error))}")
        return USAGE_ERROR


def report_error(line: str) -> None:
    """Print ``line`` on stderr, once even when every process of a launched run fails with it.

    Process 0 prints at once. Any other process may hold an error of its own (a shard only it
    reads, a directory only its node lacks), so it prints too, marked with its rank, but only after
    :data:`OTHER_PROCESS_GRACE_S`: when all processes fail alike, the launcher stops the others as
    soon as process 0 exits, and the line appears once. Under torchrun's agent (``accelerate launch
    --multi_gpu`` included) the line also goes to the error file the agent reads, so the launcher's
    report of the failed process ends with it instead of a hint on how to enable tracebacks.
    """
    _write_launcher_error_file(line)
    rank = process_rank()
    if rank != 0:
        time.sleep(OTHER_PROCESS_GRACE_S)
        line = f"{line} (process {rank})"
    print(line, file=sys.stderr, flush=True)


def _write_launcher_error_file(line: str) -> None:
    # torch.distributed.elastic's reply file: a string "message" is shown as the failure's traceback
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        with open(path, "w", encoding="utf-8") as handle:
            json.dump({"message": line, "timestamp": int(time.time())}, handle)
    except OSError:
        pass  # the terminal still gets the line


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
