"""``mmsphere train`` / ``accelerate launch scripts/train.py``: parse arguments, build the config, train."""

from __future__ import annotations

import argparse
import json
import logging

from mmsphere.cli_errors import ArgumentParser, run_cli
from mmsphere.config import load_config
from mmsphere.train import train


def main(argv: list[str] | None) -> int:
    """Run one fine-tuning job from a YAML config plus ``dotted.key=value`` overrides."""
    parser = ArgumentParser(prog="mmsphere train", description=__doc__)
    parser.add_argument("--config", required=True, help="YAML config, e.g. configs/demo.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. train.max_steps=100")
    return run_cli(parser, argv, run_training)


def run_training(args: argparse.Namespace) -> int:
    """Load and validate the config, then train and print the summary."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = load_config(args.config, args.overrides)
    print(json.dumps(train(config), indent=2))
    return 0
