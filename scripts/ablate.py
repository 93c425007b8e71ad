"""Thin wrapper over mmsphere.ablation: `python scripts/ablate.py --config BASE.yaml --seeds N --out DIR`."""

import sys

from mmsphere.ablation import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
