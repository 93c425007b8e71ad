"""Thin wrapper: `python scripts/score_ood.py ...` is `mmsphere score-ood ...`."""

import sys

from mmsphere.cli import run_command

if __name__ == "__main__":
    sys.exit(run_command("score-ood", sys.argv[1:]))
