"""Meta weighting at full-model scale: step time and peak memory of each meta-gradient path, and its floor.

ViT-B-32 (random init, as ``configs/msrvtt_vitb32.yaml`` without weights), a video batch of
``--clips`` clips × ``--frames`` frames, a meta batch of ``--meta-clips`` clips (default: as many),
meta iteration at every step through every parameter (``meta.params: all``), fp32, one process.
Variants: ``no_meta``; ``second_order``; ``jvp_own_forward`` (``meta.reuse_forward: false``: the
meta iteration runs its own train forward, then the real step runs another); ``jvp`` (the default:
the real step's train forward is the virtual step's). Variants run in interleaved rounds; times are
the median step, relative to the step without meta weighting in the same run; each (round, variant)
runs in a fresh process that builds its model, takes one warm-up step and times ``--steps`` steps
(several ViT-B-32 runners in one process disturb each other's timings: holding them all took 14 GB
and made the larger working sets of some variants slower than alone). The floor of an exact
meta step is the sum of the passes it cannot avoid, each timed alone in the same run (median over
the rounds): train forward (with the objective), two train backwards, meta forward + backward, one
forward-mode pass over the train batch, and the optimiser step. Peak memory is measured per variant
in a fresh subprocess (CPU: growth of the peak resident set over the resident set after the imports;
CUDA: max allocated).
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

VARIANTS = ("no_meta", "second_order", "jvp_own_forward", "jvp")
PASSES = ("train_forward", "train_backward", "meta_forward_backward", "forward_mode_pass", "optimizer_step")


def make_runner(variant: str, args):
    """Build the model, data and a ``step()`` closure of one variant."""
    torch.manual_seed(0)
    config = config_from_dict({
        "model": {"name": args.model},
        "data": {"train": [{"urls": "unused.tar"}], "meta": {"urls": "unused.tar"}, "frames": args.frames},
        "loss": {"terms": {"angular_margin": 1.0}},
        "meta": {"enabled": variant != "no_meta", "interval": 1, "params": args.params,
                 "gradient": "second_order" if variant == "second_order" else "jvp",
                 "reuse_forward": variant != "jvp_own_forward"},
        "train": {"batch_size": args.clips, "lr": 1e-5, "warmup_steps": 0, "max_steps": 10**6, "grad_clip": None,
                  "cpu": args.device == "cpu", "precision": "no"},
    })
    network = create_model(config.model).to(args.device)
    size, context = network.image_size, network.tokenizer.context_length

    def video_batch(seed: int, clips: int = args.clips) -> Batch:
        generator = torch.Generator().manual_seed(seed)
        text = torch.randint(1, 49407, (clips, context), generator=generator).to(args.device)
        frames = torch.randn(clips, args.frames, 3, size, size, generator=generator).to(args.device)
        return Batch("video", frames, torch.ones(clips, args.frames, dtype=torch.bool, device=args.device),
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
    batch, meta_batch = video_batch(1), video_batch(2, args.meta_clips or args.clips)
    if variant == "passes":
        return _pass_timers(network, objective, optimizer, batch, meta_batch)

    def step(index: int) -> None:
        optimization_step(task, batch, optimizer, meta_batch=meta_batch if weighting else None, step=index)

    return step


def _pass_timers(network, objective, optimizer, batch: Batch, meta_batch: Batch) -> dict:
    """One closure per unavoidable pass of a meta step, each timing only its own pass (seconds)."""
    from torch.autograd import forward_ad
    from torch.func import functional_call
    from torch.nn.attention import SDPBackend, sdpa_kernel

    contrastive = objective.contrastive_only()
    inputs, meta_inputs = batch.encoder_inputs(), meta_batch.encoder_inputs()
    parameters = dict(network.named_parameters())

    def timed(run) -> float:
        start = time.perf_counter()
        run()
        return time.perf_counter() - start

    def train_forward() -> float:
        return timed(lambda: objective(**network(**inputs), seed=0).loss)

    def train_backward() -> float:
        loss = objective(**network(**inputs), seed=0).loss
        seconds = timed(loss.backward)
        optimizer.zero_grad(set_to_none=True)
        return seconds

    def meta_forward_backward() -> float:
        seconds = timed(lambda: contrastive(**network(**meta_inputs)).loss.backward())
        optimizer.zero_grad(set_to_none=True)
        return seconds

    def forward_mode_pass() -> float:
        tangents = {name: torch.randn_like(parameter) for name, parameter in parameters.items()}

        def run() -> None:
            # the math attention kernel, as the meta step runs it: the fused CPU kernel has no forward-mode rule
            with forward_ad.dual_level(), torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
                duals = {name: forward_ad.make_dual(parameter.detach(), tangents[name])
                         for name, parameter in parameters.items()}
                loss = contrastive(**functional_call(network, duals, args=(), kwargs=inputs)).loss
                forward_ad.unpack_dual(loss).tangent.item()
        return timed(run)

    def optimizer_step() -> float:
        for parameter in parameters.values():
            parameter.grad = torch.zeros_like(parameter)
        seconds = timed(optimizer.step)
        optimizer.zero_grad(set_to_none=True)
        return seconds

    return {"train_forward": train_forward, "train_backward": train_backward,
            "meta_forward_backward": meta_forward_backward, "forward_mode_pass": forward_mode_pass,
            "optimizer_step": optimizer_step}


def measure_time(variant: str, args) -> dict[str, float]:
    """Seconds per step of one variant (or each pass's seconds), after a warm-up, in this fresh process."""
    runner = make_runner(variant, args)
    if variant == "passes":
        for run in runner.values():
            run()
        return {name: statistics.median(run() for _ in range(args.steps)) for name, run in runner.items()}
    runner(0)
    start = time.perf_counter()
    for index in range(args.steps):
        runner(index + 1)
    if args.device == "cuda":
        torch.cuda.synchronize()
    return {"step": (time.perf_counter() - start) / args.steps}


def measure_memory(variant: str, args) -> float:
    """Peak memory (MB) of building one variant and running ``--steps`` steps, in this fresh process."""
    return peak_mb(lambda: make_runner(variant, args), args.steps, args.device)


def main(argv: list[str]) -> int:
    """Print the median step time and peak memory of each variant, relative to no meta weighting."""
    parser = argparse.ArgumentParser(prog="benchmark.py meta")
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--meta-clips", type=int, default=None, help="clips in the meta batch (default: --clips)")
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--params", default="all", choices=("all", "last_blocks", "heads"))
    parser.add_argument("--steps", type=int, default=2, help="timed steps per variant per round (after a warm-up step)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--time-of", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_of:
        print(json.dumps({"peak_mb": measure_memory(args.memory_of, args)}))
        return 0
    if args.time_of:
        print(json.dumps(measure_time(args.time_of, args)))
        return 0

    def child(flag: str, variant: str, steps: int) -> dict:
        command = [sys.executable, __file__.replace("benchmarks/meta.py", "benchmark.py"), "meta", flag, variant,
                   "--model", args.model, "--clips", str(args.clips), "--frames", str(args.frames),
                   "--params", args.params, "--steps", str(steps), "--device", args.device,
                   *(["--meta-clips", str(args.meta_clips)] if args.meta_clips else [])]
        done = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy(), check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])

    variants = args.variants.split(",")
    times: dict[str, list[float]] = {variant: [] for variant in variants}
    pass_times: dict[str, list[float]] = {name: [] for name in PASSES}
    for _ in range(args.rounds):
        for variant in variants:
            times[variant].append(child("--time-of", variant, args.steps)["step"])
        for name, seconds in child("--time-of", "passes", 1).items():
            pass_times[name].append(seconds)
    seconds_of = {name: statistics.median(values) for name, values in pass_times.items()}
    floor = (seconds_of["train_forward"] + 2 * seconds_of["train_backward"] + seconds_of["meta_forward_backward"]
             + seconds_of["forward_mode_pass"] + seconds_of["optimizer_step"])

    memory = {variant: child("--memory-of", variant, 2)["peak_mb"] for variant in variants}

    baseline = "no_meta" if "no_meta" in variants else variants[0]
    print(f"model={args.model} clips={args.clips} meta_clips={args.meta_clips or args.clips} frames={args.frames} "
          f"params={args.params} device={args.device} torch={torch.__version__} threads={torch.get_num_threads()} "
          f"rounds={args.rounds}")
    print("passes alone (median s): " + ", ".join(f"{name} {seconds_of[name]:.2f}" for name in PASSES)
          + f"; floor of a meta step = forward + 2 backwards + meta forward/backward + forward-mode + optimiser "
          f"= {floor:.2f} s")
    print(f"{'variant':<17}{'s/step':>8}{'vs ' + baseline:>13}{'vs floor':>10}{'peak MB':>9}{'vs ' + baseline:>13}")
    for variant in variants:
        seconds = statistics.median(times[variant])
        versus_floor = f"{seconds / floor:>9.2f}x" if variant != "no_meta" else f"{'':>10}"
        print(f"{variant:<17}{seconds:>8.2f}{seconds / statistics.median(times[baseline]):>12.2f}x{versus_floor}"
              f"{memory[variant]:>9.0f}{memory[variant] / memory[baseline]:>12.2f}x")
    return 0
