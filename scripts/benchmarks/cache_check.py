"""What it costs to make sure a feature cache is current and intact, inside a real cached training run.

A cached run checks its caches twice over: the lookup before training (the trunk-weight digest and
the identity of each cache, then every shard's file opened: its checksum, its structure and its
shard's identity, which the build compares to decide what to encode again), and the same checks
each time the training or validation stream opens a shard's file again (every epoch). This script
builds the caches of ``--config`` if missing (untimed), then times one training run of it with
the check functions of :mod:`mmsphere.data.feature_files` and :func:`mmsphere.cache.build.trunk_digest`
wrapped by timers, and prints each one's total beside the run's wall time (model loading included).

    python scripts/benchmark.py cache_check --config configs/studies/cifar10_noisy.yaml [dotted.key=value ...]
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import mmsphere.cache.build as cache_build
import mmsphere.data.feature_files as cache_store
from mmsphere.cache import build_config_caches
from mmsphere.train.config import load_config
from mmsphere.data.reader import expand_urls
from mmsphere.digest import file_sha256
from mmsphere.models import create_run_model
from mmsphere.train import train

# (module, function name, what it is): every check a cached run makes
CHECKS = [(cache_build, "trunk_digest", "trunk-weight digest (fingerprint)"),
          (cache_store, "source_identity", "shard identity (stat + tar header digest)"),
          (cache_store, "_checksum", "feature-file checksum (SHA-256)"),
          (cache_store, "_structure_problem", "feature-file structure (rows, offsets)")]


def timed(function: Callable, totals: dict[str, list[float]], name: str) -> Callable:
    """``function``, adding each call's seconds to ``totals[name]``."""
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            totals[name].append(time.perf_counter() - start)
    return wrapper


def main(argv: list[str]) -> int:
    """Print the check costs of one cached training run of ``--config`` and their share of its wall time."""
    parser = argparse.ArgumentParser(prog="benchmark.py cache_check")
    parser.add_argument("--config", required=True, help="a config with data.feature_cache: true")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides (shard paths, model paths)")
    args = parser.parse_args(argv)
    output = Path(tempfile.mkdtemp(prefix="cache_check_"))
    config = load_config(args.config, [*args.overrides, f"output_dir={output / 'run'}"])
    if not config.data.feature_cache:
        print("the config must have data.feature_cache: true", file=sys.stderr)
        return 2
    build_config_caches(create_run_model(config), config, progress=True)  # untimed: the cache exists after this

    totals: dict[str, list[float]] = {name: [] for _, name, _ in CHECKS}
    originals = [(module, name, getattr(module, name)) for module, name, _ in CHECKS]
    for module, name, function in originals:
        setattr(module, name, timed(function, totals, name))
    try:
        start = time.perf_counter()
        summary = train(config)
        run_s = time.perf_counter() - start
    finally:
        for module, name, function in originals:
            setattr(module, name, function)
        shutil.rmtree(output, ignore_errors=True)

    checks_s = sum(sum(values) for values in totals.values())
    # the shard identity's digest against hashing each shard whole (the other design), best of 5 passes
    shards = [url for source in config.data.train for url in expand_urls(source.urls)]
    digests = {name: min(_seconds(lambda: [function(url) for url in shards]) for _ in range(5))
               for name, function in [("tar_headers", cache_store._tar_index_digest),
                                      ("whole_content", file_sha256)]}
    result = {
        "command": "python scripts/benchmark.py cache_check " + " ".join(argv), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "steps": summary["steps"], "run_s": run_s,
        "checks": {name: {"calls": len(totals[name]), "s": sum(totals[name])} for _, name, _ in CHECKS},
        "checks_s": checks_s, "checks_share_of_run": checks_s / run_s,
        "training_shards": len(shards), "training_shard_mb": sum(Path(url).stat().st_size for url in shards) / 1e6,
        "digest_all_training_shards_s": digests,
    }
    print(json.dumps(result, indent=2))
    print(f"\n| check | calls | s | share of the run ({run_s:.1f} s, {summary['steps']} steps) |\n|---|---|---|---|")
    for _, name, what in CHECKS:
        seconds = sum(totals[name])
        print(f"| {what} | {len(totals[name])} | {seconds:.3f} | {100 * seconds / run_s:.2f}% |")
    print(f"| **all checks** | | **{checks_s:.3f}** | **{100 * checks_s / run_s:.2f}%** |")
    print(f"\none pass over the {len(shards)} training shards ({result['training_shard_mb']:.1f} MB): "
          f"tar-header digest {1000 * digests['tar_headers']:.1f} ms, "
          f"whole-content SHA-256 {1000 * digests['whole_content']:.1f} ms")
    return 0


def _seconds(work: Callable[[], Any]) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start
