"""``mmsphere cache``: encode every source of a config once through the frozen trunks (resumable)."""

from __future__ import annotations

import argparse
import json
import logging
import time

from mmsphere.cli_errors import ArgumentParser, run_cli
from mmsphere.train.config import load_config


def main(argv: list[str] | None) -> int:
    """Build the feature caches a config's run reads (train, meta and val sources)."""
    parser = ArgumentParser(prog="mmsphere cache", description=__doc__)
    parser.add_argument("--config", required=True, help="YAML config with model.trainable=heads")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. data.feature_cache_dir=/fast")
    return run_cli(parser, argv, build)


def build(args: argparse.Namespace) -> int:
    """Load the config and the model, then build what is missing of each cache and print where it lies."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # lazy: open_clip takes seconds to import; `mmsphere cache --help` should not
    from mmsphere.cache.build import build_config_caches, cache_jobs
    from mmsphere.data.reader import check_shards
    from mmsphere.models import create_run_model

    config = load_config(args.config, args.overrides)
    started = time.time()
    model = create_run_model(config)  # as training builds it: randomly initialised towers get the same weights
    train, val = build_config_caches(model, config)
    summary = {name: {"fingerprint": cache.fingerprint, "directory": str(cache.directory_for(check_shards(urls, name)[0]))}
               for name, cache, urls in cache_jobs(config, train, val)}
    print(json.dumps({"caches": summary, "wall_time_s": round(time.time() - started, 1)}, indent=2))
    return 0
