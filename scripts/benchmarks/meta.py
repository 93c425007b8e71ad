"""Meta weighting at full-model scale: step time and peak memory of no meta, ``second_order`` and ``jvp``.

ViT-B-32 (random init, as ``configs/msrvtt_vitb32.yaml`` without weights), a video batch of
``--clips`` clips × ``--frames`` frames, a meta batch of the same size, meta iteration at every
step through every parameter (``meta.params: all``), fp32, one process. Variants run in
interleaved rounds; times are the median step, reported relative to the step without meta
weighting in the same run. Peak memory is measured per variant in a fresh subprocess (CPU: growth
of the peak resident set over the resident set after the imports; CUDA: max allocated).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from benchmarks.memory import peak_mb
from mmsphere.train.config import config_from_dict
from mmsphere.losses import Objective
from mmsphere.models import create_model
from mmsphere.data import Batch
from mmsphere.weighting import MetaWeighting
from mmsphere.train.loop import build_accelerator
from mmsphere.train.step import optimization_step
from mmsphere.train.task import Task
from mmsphere.train.optim import build_optimizer, cosine_schedule

VARIANTS = ("no_meta", "second_order", "jvp")


def make_runner(variant: str, args):
    """Build the model, data and a ``step()`` closure of one variant."""
    torch.manual_seed(0)
    config = config_from_dict({
        "model": {"name": args.model},
        "data": {"train": [{"urls": "unused.tar"}], "meta": {"urls": "unused.tar"}, "frames": args.frames},
        "loss": {"terms": {"angular_margin": 1.0}},
        "meta": {"enabled": variant != "no_meta", "interval": 1, "params": args.params,
                 "gradient": "jvp" if variant == "no_meta" else variant},
        "train": {"batch_size": args.clips, "lr": 1e-5, "warmup_steps": 0, "max_steps": 10**6, "grad_clip": None,
                  "cpu": args.device == "cpu", "precision": "no"},
    })
    network = create_model(config.model).to(args.device)
    size, context = network.image_size, network.tokenizer.context_length

    def video_batch(seed: int) -> Batch:
        generator = torch.Generator().manual_seed(seed)
        text = torch.randint(1, 49407, (args.clips, context), generator=generator).to(args.device)
        frames = torch.randn(args.clips, args.frames, 3, size, size, generator=generator).to(args.device)
        return Batch("video", frames, torch.ones(args.clips, args.frames, dtype=torch.bool, device=args.device),
                     text=text)

    accelerator = build_accelerator(config)
    objective = Objective(config.loss)
    optimizer = build_optimizer(network, config)
    scheduler = cosine_schedule(optimizer, 0, config.train.max_steps)
    model, optimizer = accelerator.prepare(network, optimizer)
    weighting = MetaWeighting(config, network, objective) if config.meta.enabled else None
    if weighting is not None:
        weighting.weight_net.to(args.device)
    task = Task.from_config(config, network, accelerator, model=model, objective=objective, weighting=weighting,
                            scheduler=scheduler)
    batch, meta_batch = video_batch(1), video_batch(2)

    def step(index: int) -> None:
        optimization_step(task, batch, optimizer, meta_batch=meta_batch if weighting else None, step=index)

    return step


def measure_memory(variant: str, args) -> float:
    """Peak memory (MB) of building one variant and running ``--steps`` steps, in this fresh process."""
    return peak_mb(lambda: make_runner(variant, args), args.steps, args.device)


def main(argv: list[str]) -> int:
    """Print the median step time and peak memory of each variant, relative to no meta weighting."""
    parser = argparse.ArgumentParser(prog="benchmark.py meta")
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--params", default="all", choices=("all", "last_blocks", "heads"))
    parser.add_argument("--steps", type=int, default=1, help="steps per variant per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_of:
        print(json.dumps({"peak_mb": measure_memory(args.memory_of, args)}))
        return 0

    variants = args.variants.split(",")
    runners = {variant: make_runner(variant, args) for variant in variants}
    for step in runners.values():  # warm-up outside the timed rounds
        step(0)
    times: dict[str, list[float]] = {variant: [] for variant in variants}
    for _ in range(args.rounds):
        for variant, step in runners.items():
            if args.device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for index in range(args.steps):
                step(index)
            if args.device == "cuda":
                torch.cuda.synchronize()
            times[variant].append((time.perf_counter() - start) / args.steps)
    del runners

    memory = {}
    for variant in variants:
        command = [sys.executable, __file__.replace("benchmarks/meta.py", "benchmark.py"), "meta", "--memory-of",
                   variant, "--model", args.model, "--clips", str(args.clips), "--frames", str(args.frames),
                   "--params", args.params, "--steps", "2", "--device", args.device]
        child = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy(), check=True)
        memory[variant] = json.loads(child.stdout.strip().splitlines()[-1])["peak_mb"]

    baseline = "no_meta" if "no_meta" in variants else variants[0]
    print(f"model={args.model} clips={args.clips} frames={args.frames} params={args.params} device={args.device} "
          f"torch={torch.__version__} threads={torch.get_num_threads()} rounds={args.rounds}")
    print(f"{'variant':<14}{'s/step':>10}{'vs ' + baseline:>14}{'peak MB':>10}{'vs ' + baseline:>14}")
    for variant in variants:
        seconds = statistics.median(times[variant])
        print(f"{variant:<14}{seconds:>10.2f}{seconds / statistics.median(times[baseline]):>13.2f}x"
              f"{memory[variant]:>10.0f}{memory[variant] / memory[baseline]:>13.2f}x")
    return 0
