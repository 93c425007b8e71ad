"""What a command shows on the terminal, and what goes only to a run's log file.

The terminal gets what a user acts on: warnings and errors, progress bars, and the few INFO records
a module marks with ``extra=ON_CONSOLE`` (a checkpoint written, a model trained from random
initialisation on purpose). Every other record (open_clip's model-building chatter, what each
checkpoint file holds, the summary as a log line) goes only to the log file a run keeps in its
directory (:func:`run_log_file`). Under a launcher that starts several processes, only process 0
writes to the terminal, except for errors; the other processes' warnings go to their own log files.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from tqdm.auto import tqdm

# logger.info(..., extra=ON_CONSOLE): an INFO record the terminal shows too
ON_CONSOLE = {"console": True}
RUN_LOG = "train.log"
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def process_rank() -> int:
    """This process's rank when a launcher started it (accelerate and torchrun set ``RANK``), else 0."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


class ConsoleHandler(logging.Handler):
    """Writes to stderr through tqdm, so that a progress bar is redrawn below a message instead of torn by it."""

    def __init__(self, rank: int = 0) -> None:
        super().__init__()
        self.rank = rank
        self.setFormatter(_ConsoleFormatter())

    def filter(self, record: logging.LogRecord) -> bool:
        if self.rank != 0:
            return record.levelno >= logging.ERROR
        return record.levelno >= logging.WARNING or getattr(record, "console", False)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


class _ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno < logging.WARNING:
            return message
        return f"{record.levelname} {record.name}: {message}"


@contextlib.contextmanager
def console_logging() -> Iterator[None]:
    """Logging for a command while it runs: every INFO record reaches the log files, the terminal what it should.

    The root logger's level and handlers are restored afterwards, so that a command run in-process (a
    test, a notebook) leaves the caller's logging as it was.
    """
    root = logging.getLogger()
    level, handler = root.level, ConsoleHandler(process_rank())
    root.setLevel(logging.INFO)
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


@contextlib.contextmanager
def run_log_file(directory: str | os.PathLike, rank: int = 0) -> Iterator[Path]:
    """Append every log record of this process to the run's log file while the block runs.

    Process 0 writes ``train.log``; process ``r`` writes its warnings and errors to ``train.rank<r>.log``,
    created only when it has one. Which records exist at all is the logging configuration's choice
    (:func:`console_logging` lets INFO through).
    """
    if rank == 0:
        path, level = Path(directory) / RUN_LOG, logging.NOTSET
    else:
        path, level = Path(directory) / f"train.rank{rank}.log", logging.WARNING
    handler = logging.FileHandler(path, encoding="utf-8", delay=True)
    handler.setLevel(level)
    handler.setFormatter(logging.Formatter(FILE_FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield path
    finally:
        root.removeHandler(handler)
        handler.close()
