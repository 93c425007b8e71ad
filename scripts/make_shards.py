"""Thin wrapper: `python scripts/make_shards.py ...` is `mmsphere make-shards ...`."""

import sys

from mmsphere.cli import run_command

if __name__ == "__main__":
    sys.exit(run_command("make-shards", sys.argv[1:]))
