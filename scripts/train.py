"""Thin wrapper: `python scripts/train.py ...` is `mmsphere train ...`."""

import sys

from mmsphere.cli import run_command

if __name__ == "__main__":
    sys.exit(run_command("train", sys.argv[1:]))
