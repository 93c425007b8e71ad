"""Thin wrapper: `python scripts/ablate.py ...` is `mmsphere ablate ...`."""

import sys

from mmsphere.cli import run_command

if __name__ == "__main__":
    sys.exit(run_command("ablate", sys.argv[1:]))
