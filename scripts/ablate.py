"""Thin wrapper: `python scripts/ablate.py --config BASE.yaml --variants ... --seeds N --out DIR` (mmsphere.ablation)."""

import sys

from mmsphere.ablation import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
