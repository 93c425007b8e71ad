"""Training-step throughput: mmsphere's step vs open_clip's own forward/backward/step sequence.

Same tiny model (``mmsphere-small`` by default), same synthetic data, same batch, one process.
Variants run in interleaved rounds; the figure is samples/s relative to open_clip in the same run.
Peak memory is measured per variant in a fresh subprocess (peak RSS growth over the resident set
after the imports, on CPU; ``torch.cuda.max_memory_allocated`` on GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import open_clip
import torch

from benchmarks.memory import peak_mb
from mmsphere.train.config import config_from_dict
from mmsphere.data import Batch
from mmsphere.losses import Objective
from mmsphere.models import create_model
from mmsphere.weighting import MetaWeighting
from mmsphere.train.loop import build_accelerator
from mmsphere.train.step import optimization_step
from mmsphere.train.task import Task
from mmsphere.train.optim import build_optimizer, cosine_schedule

# meta_every_N: a meta iteration every N steps (meta.gradient jvp); *_second_order: the reference path
VARIANTS = ("open_clip", "clip_loss", "meta_every_1", "meta_every_1_second_order", "meta_every_5", "meta_every_10")


def make_runner(variant: str, model_name: str, batch: int, device: str):
    """Build the model, data and a ``step()`` closure of one variant."""
    torch.manual_seed(0)
    config = config_from_dict({
        "model": {"name": model_name},
        "data": {"train": [{"urls": "unused.tar", "modality": "image"}], "meta": {"urls": "unused.tar", "modality": "image"}},
        "loss": {"terms": {"clip": 1.0}},
        "meta": {"enabled": variant.startswith("meta"),
                 "interval": int(variant.split("_")[2]) if variant.startswith("meta") else 1,
                 "gradient": "second_order" if variant.endswith("second_order") else "jvp", "params": "heads"},
        "train": {"batch_size": batch, "lr": 1e-4, "warmup_steps": 0, "max_steps": 10**6, "grad_clip": None,
                  "cpu": device == "cpu", "precision": "bf16" if device == "cuda" else "no"},
    })
    if variant == "open_clip":
        model = open_clip.create_model(model_name).to(device)
        image_size = model.visual.image_size
        image_size = image_size[0] if isinstance(image_size, (tuple, list)) else image_size
        context = model.context_length
    else:
        network = create_model(config.model).to(device)
        image_size, context = network.image_size, network.tokenizer.context_length
    images = torch.randn(batch, 3, image_size, image_size, device=device)
    text = torch.randint(1, 49407, (batch, context), device=device)
    meta_images = torch.randn(batch, 3, image_size, image_size, device=device)
    meta_text = torch.randint(1, 49407, (batch, context), device=device)

    if variant == "open_clip":
        loss_fn = open_clip.ClipLoss()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")

        def step(_: int) -> None:
            with autocast:
                image_features, text_features, logit_scale = model(images, text)[:3]
                loss = loss_fn(image_features, text_features, logit_scale)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                model.logit_scale.clamp_(0, 4.6052)

        return step

    accelerator = build_accelerator(config)
    objective = Objective(config.loss)
    optimizer = build_optimizer(network, config)
    scheduler = cosine_schedule(optimizer, 0, config.train.max_steps)
    model, optimizer = accelerator.prepare(network, optimizer)
    weighting = MetaWeighting(config, network, objective) if config.meta.enabled else None
    if weighting is not None:
        weighting.weight_net.to(device)
    task = Task.from_config(config, network, accelerator, model=model, objective=objective, weighting=weighting,
                            scheduler=scheduler)
    batch, meta_batch = Batch("image", images, text=text), Batch("image", meta_images, text=meta_text)

    def step(index: int) -> None:
        due = weighting is not None and index % config.meta.interval == 0
        optimization_step(task, batch, optimizer, meta_batch=meta_batch if due else None, step=index)

    return step


def measure_memory(variant: str, args) -> float:
    """Peak memory (MB) of building one variant and running ``steps`` steps, in this (fresh) process.

    CPU: growth of the peak resident set (VmHWM, reset through /proc/self/clear_refs) over the
    resident set after the imports, so torch's own import footprint is not counted.
    """
    return peak_mb(lambda: make_runner(variant, args.model, args.batch, args.device), args.steps, args.device)


def main(argv: list[str]) -> int:
    """Print samples/s of each variant relative to open_clip, and peak memory."""
    parser = argparse.ArgumentParser(prog="benchmark.py train")
    parser.add_argument("--model", default="mmsphere-small")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="steps per variant per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_of:
        print(json.dumps({"peak_mb": measure_memory(args.memory_of, args)}))
        return 0

    variants = args.variants.split(",")
    runners = {variant: make_runner(variant, args.model, args.batch, args.device) for variant in variants}
    for variant, step in runners.items():  # warm-up outside the timed rounds
        for index in range(2):
            step(index)
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
            times[variant].append(time.perf_counter() - start)

    memory = {}
    for variant in variants:
        child = subprocess.run([sys.executable, __file__.replace("benchmarks/train.py", "benchmark.py"), "train",
                                "--memory-of", variant, "--model", args.model, "--batch", str(args.batch),
                                "--steps", str(args.steps), "--device", args.device],
                               capture_output=True, text=True, env=os.environ.copy(), check=True)
        memory[variant] = json.loads(child.stdout.strip().splitlines()[-1])["peak_mb"]

    baseline = statistics.median(times["open_clip"]) if "open_clip" in times else None
    print(f"model={args.model} batch={args.batch} device={args.device} torch={torch.__version__} "
          f"threads={torch.get_num_threads()} steps/round={args.steps} rounds={args.rounds}")
    print(f"{'variant':<16}{'samples/s':>12}{'vs open_clip':>14}{'peak MB':>10}")
    for variant in variants:
        seconds = statistics.median(times[variant])
        rate = args.batch * args.steps / seconds
        ratio = f"{baseline / seconds:.2f}x" if baseline else "-"
        print(f"{variant:<16}{rate:>12.1f}{ratio:>14}{memory[variant]:>10.0f}")
    return 0
