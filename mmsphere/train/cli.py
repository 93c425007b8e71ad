"""``mmsphere train`` / ``accelerate launch scripts/train.py``: parse arguments, build the config, train."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from mmsphere.config import MmsphereError, load_config


def main(argv: list[str]) -> int:
    """Run one fine-tuning job from a YAML config plus ``dotted.key=value`` overrides."""
    parser = argparse.ArgumentParser(prog="mmsphere train", description=__doc__)
    parser.add_argument("--config", required=True, help="YAML config, e.g. configs/demo.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. train.max_steps=100")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config, args.overrides)
        from mmsphere.train import train

        summary = train(config)
    except (MmsphereError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0
