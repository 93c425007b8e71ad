"""Frozen-tower feature cache: training steps/s from the cache vs encoding every batch, and the build cost.

``--trainable heads`` (default) trains the heads from their cached inputs; ``--trainable last_blocks=K``
trains the last K blocks of each tower too, from the cached input of the first of them.

The offline MiniLM-L6 text + EfficientNet-Lite0 image towers (``runs/offline_towers``), towers
frozen (``model.trainable: heads``), loss ``angular_margin``, CPU, fp32, no meta weighting,
``data.workers: 0``, on synthetic image-text shards written here (real 64x64 JPEGs + captions,
decoded at the model's 224 px). Three figures:

- cache build: :func:`mmsphere.cache.build_config_caches` from an empty ``features`` folder, the
  model already loaded (wall time includes the trunk-weight digest, decoding, both trunks and the
  writes); size = the ``.safetensors`` files on disk;
- steps/s: :func:`mmsphere.train.train` with ``data.feature_cache`` false and true, alternating
  for ``--rounds`` rounds, each a fresh run (model load, cache lookup and stream set-up excluded).
  Step times come from ``metrics.jsonl`` (``log_every: 1``): step ``k`` ends at
  ``k * batch / samples_per_s`` seconds after the loop starts, so the first step (data start-up,
  warm-up) is dropped and steps/s = ``(N - 1) / (t_N - t_1)``; the final checkpoint is after ``t_N``.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from safetensors import safe_open

from mmsphere.cache import build_config_caches
from mmsphere.train.config import Config, config_from_dict
from mmsphere.models import create_model
from mmsphere.train import train

REPO = Path(__file__).resolve().parents[2]
TOWERS = REPO / "runs" / "offline_towers"
ARCHITECTURE = TOWERS / "minilm-effnetlite0-offline.json"
WORDS = ("red", "green", "blue", "striped", "dotted", "square", "round", "small", "large", "bright", "dark", "pattern")


def write_shards(directory: Path, shards: int, per_shard: int, seed: int = 0) -> str:
    """Write ``shards`` tars of ``per_shard`` random-pattern 64x64 JPEGs with captions; returns the brace pattern."""
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for shard in range(shards):
        with wds.TarWriter(str(directory / f"bench-{shard:06d}.tar")) as writer:
            for index in range(per_shard):
                pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8).repeat(8, axis=0).repeat(8, axis=1)
                buffer = io.BytesIO()
                Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
                caption = "a " + " ".join(rng.choice(WORDS, size=4)) + f" image number {shard * per_shard + index}"
                writer.write({"__key__": f"s{shard:03d}_{index:05d}", "jpg": buffer.getvalue(), "txt": caption})
    return str(directory / f"bench-{{000000..{shards - 1:06d}}}.tar")


def make_config(urls: str, output_dir: Path, batch: int, steps: int, cached: bool, trainable: str = "heads",
                dtype: str = "float32") -> Config:
    """Training of the offline towers' ``trainable`` part on ``urls``, logging every step."""
    return config_from_dict({
        "output_dir": str(output_dir),
        "seed": 0,
        "model": {"name": str(ARCHITECTURE), "pretrained": str(TOWERS), "trainable": trainable},
        "data": {"train": [{"name": "bench", "urls": urls, "modality": "image"}], "workers": 0,
                 "feature_cache": cached, "feature_cache_dtype": dtype},
        "loss": {"terms": {"angular_margin": 1.0}, "margin": 0.1},
        "meta": {"enabled": False},
        "train": {"max_steps": steps, "batch_size": batch, "lr": 1e-3, "warmup_steps": 0, "log_every": 1,
                  "checkpoint_every": 10**9, "cpu": True, "precision": "no"},
    })


def cache_files(features: Path) -> list[Path]:
    """The shard feature files under a ``features`` folder."""
    return sorted(features.rglob("*.safetensors")) if features.is_dir() else []


def measure_build(urls: str, shard_dir: Path, out: Path, batch: int, trainable: str = "heads",
                  dtype: str = "float32") -> dict[str, float]:
    """Build the feature cache from scratch (model loaded beforehand); wall time, size and rate."""
    features = shard_dir / "features"
    config = make_config(urls, out / "runs" / "build", batch, 1, cached=True, trainable=trainable, dtype=dtype)
    if dtype == "float32" and features.exists():
        shutil.rmtree(features)
    model = create_model(config.model)
    start = time.perf_counter()
    build_config_caches(model, config, progress=False)
    seconds = time.perf_counter() - start
    files = cache_files(features / _fingerprint(config))
    size = sum(path.stat().st_size for path in files)
    samples = _cached_samples(files)
    return {"build_s": seconds, "samples": samples, "build_samples_per_s": samples / seconds,
            "cache_mb": size / 1e6, "bytes_per_sample": size / max(samples, 1), "files": len(files)}


def _fingerprint(config: Config) -> str:
    """The folder name of ``config``'s training cache."""
    from mmsphere.cache.build import config_caches

    model = create_model(config.model)
    return next(iter(config_caches(model, config)[0].values())).fingerprint


def _cached_samples(files: list[Path]) -> int:
    """Rows of the ``trunk`` tensors of the feature files."""
    total = 0
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            total += handle.get_slice("trunk").get_shape()[0]
    return total


def timed_run(urls: str, run_dir: Path, batch: int, steps: int, cached: bool, trainable: str = "heads",
              dtype: str = "float32") -> dict[str, Any]:
    """One fresh training run; steps/s after the first step, and including it, from ``metrics.jsonl``."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    train(make_config(urls, run_dir, batch, steps, cached, trainable, dtype))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ends = {record["step"]: record["step"] * batch / record["samples_per_s"]
            for record in records if "samples_per_s" in record}
    last = max(ends)
    steady = (last - 1) / (ends[last] - ends[1]) if last > 1 else last / ends[last]
    losses = [record["loss/total"] for record in records if "loss/total" in record]
    return {"steps_per_s": steady, "steps_per_s_with_first": last / ends[last], "first_step_s": ends[1],
            "losses": losses}


def trained_part_seconds(batch: int, trainable: str, repeats: int = 5) -> float:
    """The floor of a cached step: forward + backward of the trained part alone, from block inputs in memory.

    ``last_blocks=K`` only: random images and captions are encoded to the first trained block once, then
    each repetition runs the towers from there, a contrastive loss and the gradient of every trained tensor.
    """
    import torch.nn.functional as F  # noqa: N812

    config = make_config("unused", Path("unused"), batch, 1, cached=False, trainable=trainable)
    torch.manual_seed(0)
    model = create_model(config.model).train()
    images = torch.randn(batch, 3, model.image_size, model.image_size)
    text = model.tokenizer([f"a {WORDS[index % len(WORDS)]} image number {index}" for index in range(batch)])
    image_in, text_in = model.block_inputs("image", images), model.block_inputs("text", text)
    trained = [parameter for parameter in model.parameters() if parameter.requires_grad]

    def step() -> None:
        image = F.normalize(model.encode_from_blocks("image", image_in), dim=-1)
        caption = F.normalize(model.encode_from_blocks("text", text_in, text), dim=-1)
        loss = F.cross_entropy(image @ caption.T * model.clip.logit_scale.exp(), torch.arange(batch))
        torch.autograd.grad(loss, trained, allow_unused=True)

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - start) / repeats


def main(argv: list[str]) -> int:
    """Print the cache build cost and the steps/s of cached vs uncached heads-only training."""
    parser = argparse.ArgumentParser(prog="benchmark.py cache")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="uncached steps per run (the first is not timed)")
    parser.add_argument("--cached-steps", type=int, default=30, help="cached steps per run (the first is not timed)")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--per-shard", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--out", default="runs/bench_cache")
    parser.add_argument("--float16", action="store_true",
                        help="also train from a float16-stored cache: its size and its loss curve against float32's")
    parser.add_argument("--trainable", default="heads",
                        help="model.trainable: heads (the cache holds the heads' inputs) or last_blocks=K")
    args = parser.parse_args(argv)
    if not ARCHITECTURE.is_file():
        print(f"{ARCHITECTURE} missing: pip install -e '.[offline-towers]'; "
              f"mmsphere export-offline-towers --out {TOWERS}", file=sys.stderr)
        return 2
    if args.shards * args.per_shard < 2 * args.batch:
        print(f"note: {args.shards * args.per_shard} samples < 2 batches of {args.batch}: epochs repeat samples",
              file=sys.stderr)

    out = Path(args.out).resolve()
    shard_dir = out / "shards"
    urls = write_shards(shard_dir, args.shards, args.per_shard)
    build = measure_build(urls, shard_dir, out, args.batch, args.trainable)

    runs: dict[str, list[dict[str, float]]] = {"uncached": [], "cached": []}
    for _ in range(args.rounds):
        runs["uncached"].append(timed_run(urls, out / "runs" / "uncached", args.batch, args.steps, cached=False,
                                          trainable=args.trainable))
        runs["cached"].append(timed_run(urls, out / "runs" / "cached", args.batch, args.cached_steps, cached=True,
                                        trainable=args.trainable))

    half: dict[str, Any] | None = None
    if args.float16:
        # the same cached run from float16-stored features: same seed, same batches; only the stored values differ
        half_build = measure_build(urls, shard_dir, out, args.batch, args.trainable, dtype="float16")
        half_run = timed_run(urls, out / "runs" / "cached_fp16", args.batch, args.cached_steps, cached=True,
                             trainable=args.trainable, dtype="float16")
        wide = runs["cached"][-1]["losses"]
        gaps = [abs(a - b) for a, b in zip(half_run["losses"], wide)]
        half = {"bytes_per_sample": half_build["bytes_per_sample"], "steps_per_s": half_run["steps_per_s"],
                "max_abs_loss_difference": max(gaps), "final_loss_float32": wide[-1],
                "final_loss_float16": half_run["losses"][-1], "steps_compared": len(gaps)}

    def median(variant: str, key: str) -> float:
        return statistics.median(run[key] for run in runs[variant])

    uncached, cached = median("uncached", "steps_per_s"), median("cached", "steps_per_s")
    floor = trained_part_seconds(args.batch, args.trainable) if args.trainable != "heads" else None
    command = "python scripts/benchmark.py cache " + " ".join(argv)
    result: dict[str, Any] = {
        "command": command.strip(), "trainable": args.trainable, "batch": args.batch, "samples": build["samples"], "rounds": args.rounds,
        "uncached_steps": args.steps, "cached_steps": args.cached_steps, "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "uncached_steps_per_s": uncached, "cached_steps_per_s": cached, "ratio_cached_vs_uncached": cached / uncached,
        "uncached_steps_per_s_with_first": median("uncached", "steps_per_s_with_first"),
        "cached_steps_per_s_with_first": median("cached", "steps_per_s_with_first"),
        "uncached_first_step_s": median("uncached", "first_step_s"),
        "cached_first_step_s": median("cached", "first_step_s"),
        "trained_part_s": floor, "float16": half, **build, "runs": runs,
    }
    print(json.dumps(result, indent=2))
    print(f"\n`{result['command']}` (batch {args.batch}, {build['samples']} samples, CPU, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; steps/s exclude each run's first step)\n")
    print("| figure | value |\n|---|---|")
    print(f"| uncached steps/s | {uncached:.3f} |")
    print(f"| cached steps/s | {cached:.2f} |")
    print(f"| ratio cached/uncached | {cached / uncached:.1f}x |")
    if floor is not None:
        print(f"| floor: the trained part alone, forward + backward (s/step) | {floor:.3f} |")
        print(f"| cached step / floor | {1 / cached / floor:.2f}x |")
        print(f"| most a cache can give (uncached step / floor) | {1 / uncached / floor:.1f}x |")
    if half is not None:
        print(f"| float16 storage: bytes/sample | {half['bytes_per_sample']:.0f} |")
        print(f"| float16 storage: cached steps/s | {half['steps_per_s']:.2f} |")
        print(f"| float16 vs float32 storage: largest loss difference over {half['steps_compared']} steps | "
              f"{half['max_abs_loss_difference']:.2e} (final loss {half['final_loss_float16']:.6f} vs "
              f"{half['final_loss_float32']:.6f}) |")
    print(f"| cache build s ({build['build_samples_per_s']:.0f} samples/s) | {build['build_s']:.1f} |")
    print(f"| cache MB | {build['cache_mb']:.2f} |")
    print(f"| bytes/sample | {build['bytes_per_sample']:.0f} |")
    return 0
