"""Forward+backward time of every objective term relative to ``open_clip.ClipLoss``.

``python scripts/benchmark.py losses [--batch 1024 --dim 512 --repeats 20]``. Every repetition runs
each case once, in a rotated order, so slow phases of a shared machine hit all cases alike; the
figure of a case is the median over repetitions of its time divided by the baseline's time in the
same repetition.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from typing import Callable

import numpy as np
import open_clip
import torch
import torch.nn.functional as tf
from tqdm import tqdm

from mmsphere.losses.config import LossConfig
from mmsphere.losses import Objective, functional
from mmsphere.losses.terms import TERMS
from mmsphere.losses.margins import sphereface2_bias_init

DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16}
BASELINE = "open_clip.ClipLoss"
SIGLIP_BASELINE = "open_clip.SigLipLoss"
FULL_TERMS = {"angular_margin": 1.0, "m2mix": 0.1, "calibrated_uniformity": 0.1, "cma": 0.001}
# the margin family through the objective, as training runs it: defaults, plus the variants that do more work
MARGIN_CASES = {
    "cosface": {}, "arcface": {}, "sphereface_r (v1, hard, CGD)": {}, "sphereface_r (v0)": {"version": "v0"},
    "sphereface_r (soft norms)": {"normalization": "soft"}, "cam_softmax": {}, "sface": {},
    "sphereface2 (C)": {}, "sphereface2 (A, t=3)": {"variant": "A", "margin": 0.3, "t": 3.0},
}


def build_cases(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                config: LossConfig, seed: int) -> dict[str, Callable[[], torch.Tensor]]:
    """Each case returns the scalar to backpropagate."""
    # the terms' default fields, which FULL_TERMS (bare weights) uses
    margin_options, mix_options, uniformity_options = (TERMS[name].Options() for name in
                                                       ("angular_margin", "m2mix", "calibrated_uniformity"))
    rng = np.random.default_rng(seed)
    mix_lam = float(rng.beta(mix_options.alpha, mix_options.alpha))
    calibration_lam = torch.as_tensor(rng.beta(uniformity_options.alpha, uniformity_options.alpha,
                                               size=image_features.shape[0]))
    clip_baseline = open_clip.ClipLoss()
    siglip_baseline = open_clip.loss.SigLipLoss()
    siglip_objective = Objective(LossConfig(terms={"siglip": {"weight": 1.0, "margin": 0.0}}))
    siglip_margin_objective = Objective(LossConfig(terms={"siglip": {"weight": 1.0, "margin": 0.1}}))
    bias = torch.tensor(-10.0, requires_grad=True)
    margin_objective = Objective(LossConfig(terms={"angular_margin": {"weight": 1.0, "margin": margin_options.margin}}))
    full_objective = Objective(config)
    img, txt, scale = image_features, text_features, logit_scale

    def calibrated_uniformity_both() -> torch.Tensor:
        with torch.no_grad():  # the calibration is detached (the default)
            fused = functional.slerp(img, txt, calibration_lam.to(img.dtype))
            calibration = (fused @ fused.T).clamp(uniformity_options.min_sim, uniformity_options.max_sim)
        return 0.5 * (functional.calibrated_uniformity(img, calibration, uniformity_options.t)
                      + functional.calibrated_uniformity(txt, calibration, uniformity_options.t))

    def plain_composition() -> torch.Tensor:
        return (FULL_TERMS["angular_margin"] * functional.angular_margin_loss(img, txt, scale, margin_options.margin)
                + FULL_TERMS["m2mix"] * functional.m2mix_loss(img, txt, mix_lam, mix_options.tau)
                + FULL_TERMS["calibrated_uniformity"] * calibrated_uniformity_both()
                + FULL_TERMS["cma"] * functional.cma_regularizer(img, txt, scale))

    margin_objectives = {label: Objective(LossConfig(terms={label.split(" ")[0]: {"weight": 1.0, **options}}))
                         for label, options in MARGIN_CASES.items()}
    # norms that move with the features (what SphereFace-R's soft normalisation reads), and SphereFace2's bias start
    norms = {"image_norms": img.detach().norm(dim=1) * 8 + img[:, 0], "text_norms": txt.detach().norm(dim=1) * 8
             + txt[:, 0]}
    margin_bias = torch.tensor(sphereface2_bias_init(img.shape[0], 0.7, 1.0, 0.1, float(scale.detach())), requires_grad=True)

    def margin_case(label: str) -> Callable[[], torch.Tensor]:
        objective = margin_objectives[label]
        extras = {**(norms if objective.needs_feature_norms else {}),
                  **({"logit_bias": margin_bias} if objective.needs_logit_bias else {})}
        return lambda: objective(img, txt, scale, step=500, **extras).loss

    return {
        BASELINE: lambda: clip_baseline(img, txt, scale),
        "clip_loss": lambda: functional.clip_loss(img, txt, scale),
        "angular_margin_loss": lambda: functional.angular_margin_loss(img, txt, scale, margin_options.margin),
        "m2mix_loss": lambda: functional.m2mix_loss(img, txt, mix_lam, mix_options.tau),
        "calibrated_uniformity (img+txt, with S)": calibrated_uniformity_both,
        "cma_regularizer": lambda: functional.cma_regularizer(img, txt, scale),
        "Objective(angular_margin)": lambda: margin_objective(img, txt, scale, seed=seed).loss,
        "composition, sum of plain functions": plain_composition,
        "Objective(full composition)": lambda: full_objective(img, txt, scale, seed=seed).loss,
        SIGLIP_BASELINE: lambda: siglip_baseline(img, txt, scale, bias),
        "siglip_loss": lambda: functional.siglip_loss(img, txt, scale, bias),
        "Objective(siglip)": lambda: siglip_objective(img, txt, scale, logit_bias=bias).loss,
        "Objective(siglip, margin 0.1)": lambda: siglip_margin_objective(img, txt, scale, logit_bias=bias).loss,
        **{f"Objective({label})": margin_case(label) for label in MARGIN_CASES},
    }


def main(argv: list[str]) -> int:
    """Run the benchmark, print the table, optionally write JSON; returns an exit code."""
    parser = argparse.ArgumentParser(prog="benchmark.py losses", description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own choice)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: elapsed time; cpu: this process's CPU time, which a busy shared machine "
                             "distorts less (meaningful with --threads 1: idle threads spin on CPU time)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cases", nargs="*", metavar="SUBSTRING",
                        help="only the cases whose name contains one of these (the baseline always runs)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.batch < 2 or args.dim < 1 or args.repeats < 1 or args.warmup < 0 or (args.threads or 1) < 1:
        parser.error("--batch must be >= 2, --dim >= 1, --repeats >= 1, --warmup >= 0, --threads >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    dtype = DTYPES[args.dtype]
    image_features = tf.normalize(torch.randn(args.batch, args.dim), dim=1).to(dtype).requires_grad_()
    text_features = tf.normalize(torch.randn(args.batch, args.dim), dim=1).to(dtype).requires_grad_()
    logit_scale = torch.tensor(1 / 0.07).requires_grad_()
    config = LossConfig(terms=dict(FULL_TERMS))
    cases = build_cases(image_features, text_features, logit_scale, config, args.seed)
    leaves = (image_features, text_features, logit_scale)

    clock = time.perf_counter if args.clock == "wall" else time.process_time

    def run_once(case: Callable[[], torch.Tensor]) -> float:
        for leaf in leaves:
            leaf.grad = None
        start = clock()
        case().backward()
        return clock() - start

    names = [name for name in cases
             if name in (BASELINE, SIGLIP_BASELINE) or not args.cases or any(part in name for part in args.cases)]
    for _ in range(args.warmup):
        for name in names:
            run_once(cases[name])
    times: dict[str, list[float]] = {name: [] for name in names}
    for repeat in tqdm(range(args.repeats), desc="repetitions", unit="rep"):
        rotation = repeat % len(names)
        for name in names[rotation:] + names[:rotation]:
            times[name].append(run_once(cases[name]))

    ratios = {name: statistics.median(t / b for t, b in zip(times[name], times[BASELINE])) for name in names}
    medians_ms = {name: 1e3 * statistics.median(times[name]) for name in names}
    machine = (f"{platform.processor() or platform.machine()}, nproc={os.cpu_count()}, "
               f"torch {torch.__version__} ({torch.get_num_threads()} threads), open_clip {open_clip.__version__}")
    print(f"B={args.batch} D={args.dim} {args.dtype} CPU, forward+backward, {args.clock} clock, "
          f"{args.repeats} interleaved repetitions")
    print(machine)
    width = max(len(name) for name in names)
    print(f"{'case':<{width}}  {'median ms':>9}  {'× ClipLoss':>10}")
    for name in names:
        print(f"{name:<{width}}  {medians_ms[name]:9.1f}  {ratios[name]:10.2f}")
    if SIGLIP_BASELINE in names:
        for name in [name for name in names if name.startswith("Objective(siglip")]:
            versus = statistics.median(t / b for t, b in zip(times[name], times[SIGLIP_BASELINE]))
            print(f"{name} / {SIGLIP_BASELINE}: {versus:.2f}x")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "machine": machine, "median_ms": medians_ms, "ratio_to_clip": ratios},
                      handle, indent=2)
    return 0
