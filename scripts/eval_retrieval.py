"""Thin wrapper: `python scripts/eval_retrieval.py ...` is `mmsphere eval-retrieval ...`."""

import sys

from mmsphere.cli import run_command

if __name__ == "__main__":
    sys.exit(run_command("eval-retrieval", sys.argv[1:]))
