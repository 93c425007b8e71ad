"""``mmsphere train`` / ``accelerate launch scripts/train.py``: parse arguments, build the config, train.

The terminal shows the progress bar, a line per checkpoint, warnings and the summary; everything
else goes to the run's ``train.log`` (:mod:`mmsphere.console`). Under a launcher only process 0
prints. Ctrl-C ends with one line: the command that resumes the run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

from mmsphere.cli_errors import OTHER_PROCESS_GRACE_S, ArgumentParser, run_cli
from mmsphere.errors import MmsphereError
from mmsphere.train.config import load_config
from mmsphere.console import console_logging, process_rank
from mmsphere.train import train
from mmsphere.train.loop import TrainingInterrupted

INTERRUPTED = 130  # 128 + SIGINT, the shell's status for a command stopped by Ctrl-C


def main(argv: list[str] | None) -> int:
    """Run one fine-tuning job from a YAML config plus ``dotted.key=value`` overrides."""
    parser = ArgumentParser(prog="mmsphere train", description=__doc__)
    parser.add_argument("--config", required=True, help="YAML config, e.g. configs/demo.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. train.max_steps=100")
    argv = list(sys.argv[1:] if argv is None else argv)
    with console_logging(), interrupt_once():
        try:
            return run_cli(parser, argv, run_training)
        except KeyboardInterrupt as stop:
            if process_rank() == 0:
                print(interrupted_line(stop, argv), file=sys.stderr, flush=True)
            return INTERRUPTED


def run_training(args: argparse.Namespace) -> int:
    """Load and validate the config, then train and print the summary (process 0)."""
    config = load_config(args.config, args.overrides)
    try:
        summary = train(config)
    except Exception as error:
        if not isinstance(error, MmsphereError) and _raised_in_a_collective(error):
            # a collective fails here when another process has stopped (on an error of its own, which it
            # prints): the launcher stops this process meanwhile, and the terminal keeps the other's line
            time.sleep(OTHER_PROCESS_GRACE_S)
        raise
    if process_rank() == 0:
        print(json.dumps(summary, indent=2))
    return 0


def _raised_in_a_collective(error: BaseException) -> bool:
    return any("torch/distributed/" in frame.filename.replace(os.sep, "/")
               for frame in traceback.extract_tb(error.__traceback__))


@contextlib.contextmanager
def interrupt_once() -> Iterator[None]:
    """Ctrl-C raises ``KeyboardInterrupt`` once; further SIGINT and SIGTERM are ignored while the run winds down.

    A launcher passes the user's Ctrl-C on to its processes (torchrun sends SIGINT again,
    ``accelerate launch`` SIGTERM), which would otherwise cut the clean-up short, half-printed.
    """
    if sys.platform == "win32" or threading.current_thread() is not threading.main_thread():
        yield
        return

    def first(signum, frame):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    previous = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, first)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def interrupted_line(stop: KeyboardInterrupt, argv: list[str]) -> str:
    """One line for Ctrl-C: where the run stands and the exact command that continues it."""
    if not isinstance(stop, TrainingInterrupted):
        return "mmsphere train: interrupted before the run started"
    where = (f"the last checkpoint is step {int(stop.checkpoint.name.split('_')[-1])}" if stop.checkpoint is not None
             else "no checkpoint yet, so it starts over")
    return f"mmsphere train: interrupted; {where}. Resume with: {resume_command(argv, stop.output_dir)}"


def resume_command(argv: list[str], output_dir: Path) -> str:
    """The command line that ran this process, with ``train.resume=latest output_dir=<its output dir>``.

    Under a launcher (``accelerate launch``, ``torchrun``) the launcher's own arguments are taken from
    its command line, the parent process's.
    """
    kept = [argument for argument in argv if not argument.startswith(("train.resume=", "output_dir="))]
    return shlex.join([*_command_prefix(), *kept, "train.resume=latest", f"output_dir={output_dir}"])


def _command_prefix() -> list[str]:
    script = sys.argv[0]
    launcher = _parent_command()
    if script in launcher:  # started by a launcher, which names the script: its arguments up to there
        return _short_launcher(launcher[:launcher.index(script) + 1])
    if "LOCAL_RANK" in os.environ:  # a launcher whose command line is not readable here
        return ["accelerate", "launch", "<launcher options>", script]
    if script.endswith(".py"):
        return ["python", script]
    return ["mmsphere", "train"]


def _parent_command() -> list[str]:
    try:  # Linux; elsewhere the generic form above
        return Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode().split("\0")[:-1]
    except (OSError, UnicodeDecodeError):
        return []


def _short_launcher(command: list[str]) -> list[str]:
    """``/venv/bin/python /venv/bin/accelerate launch ...`` as typed: ``accelerate launch ...``."""
    if len(command) > 1 and Path(command[0]).name.startswith("python") and Path(command[1]).name in (
            "accelerate", "torchrun"):
        command = [Path(command[1]).name, *command[2:]]
    elif command and Path(command[0]).name in ("accelerate", "torchrun"):
        command = [Path(command[0]).name, *command[1:]]
    elif command and Path(command[0]).name.startswith("python"):
        command = ["python", *command[1:]]
    return command
