"""Benchmarks: ``python scripts/benchmark.py AREA [options]`` with AREA one of losses, data, train, eval, meta, cache,
cache_check.

Each area lives in ``scripts/benchmarks/AREA.py`` with a ``main(argv) -> int``; figures are ratios
against a baseline measured in the same run, and go into BENCHMARKS.md with the command.
"""

import importlib
import sys
from pathlib import Path

AREAS = ("losses", "data", "train", "eval", "meta", "cache", "cache_check")

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in AREAS:
        print(f"usage: python scripts/benchmark.py {{{','.join(AREAS)}}} [options]", file=sys.stderr)
        sys.exit(2)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    module = importlib.import_module(f"benchmarks.{sys.argv[1]}")
    sys.exit(module.main(sys.argv[2:]))
