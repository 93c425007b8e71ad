"""Thin wrapper: `python scripts/demo.py ...` is `mmsphere demo ...`."""

import sys

from mmsphere.cli import run_command

if __name__ == "__main__":
    sys.exit(run_command("demo", sys.argv[1:]))
