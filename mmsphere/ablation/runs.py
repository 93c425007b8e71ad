"""The ablation study: every variant × seed trained (or resumed, or reused), evaluated and recorded in OUT/."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import set_seed

from mmsphere.ablation.evaluation import OodSets, evaluate_model, evaluate_weights, evaluation_settings
from mmsphere.ablation.summary import aggregate, ablation_markdown, plot_ablation
from mmsphere.ablation.variants import (
    ZERO_SHOT,
    checked_seeds,
    checked_variants,
    seeded_config,
    variant_config,
    variant_overrides,
)
from mmsphere.config import config_to_dict
from mmsphere.errors import ConfigError, MmsphereError
from mmsphere.train.config import Config, load_config
from mmsphere.eval.report import versions, write_json
from mmsphere.models import create_model, load_run
from mmsphere.train import train
from mmsphere.train.preflight import check_data_sources

logger = logging.getLogger(__name__)

RUN_RESULT = "ablation_run.json"
OOD_SCORES_FILE = "ood_scores.npz"


def run_ablation(
    base: Config,
    variants: Sequence[str],
    seeds: Sequence[int],
    out_dir: str | os.PathLike,
    *,
    zero_shot: bool = False,
    ood: OodSets | None = None,
    mismatched_keys: set[str] | None = None,
    eval_batch_size: int | None = None,
    description: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train and evaluate every variant × seed; write ``ablation.json``, ``ablation.md`` and ``ablation.png``.

    ``seeds`` replace ``base.seed``; ``zero_shot`` adds a row for the untrained model of each seed;
    ``mismatched_keys`` (sample keys of deliberately mismatched pairs) enables the AUROC of the
    learned weights for variants with meta weighting. Returns what ``ablation.json`` holds.
    """
    started = time.time()
    variants = checked_variants(variants)
    seeds = checked_seeds(seeds)
    if base.data.val is None:
        raise ConfigError("data.val is not set: the ablation evaluates every run on the validation set")
    if eval_batch_size is not None and eval_batch_size < 1:
        raise ValueError(f"eval_batch_size={eval_batch_size} must be >= 1")
    check_data_sources(base)
    if ood is not None:
        ood.check()
    out_dir = Path(out_dir)
    # every config is built and checked before the first run starts
    plan = [(variant, seed, variant_config(base, variant, seed, out_dir / variant / f"seed_{seed}"))
            for variant in variants for seed in seeds]
    if zero_shot:
        plan = [(ZERO_SHOT, seed, seeded_config(base, seed, out_dir / ZERO_SHOT / f"seed_{seed}"))
                for seed in seeds] + plan
    for _, _, config in plan:
        check_same_config(Path(config.output_dir), config)

    runs = []
    for index, (variant, seed, config) in enumerate(plan, start=1):
        logger.info("[%d/%d] %s, seed %d -> %s", index, len(plan), variant, seed, config.output_dir)
        runs.append(run_variant(variant, seed, config, ood=ood, mismatched_keys=mismatched_keys,
                                eval_batch_size=eval_batch_size))

    results = {
        "description": description or {},
        "base_config": config_to_dict(base),
        "variants": {**({ZERO_SHOT: {}} if zero_shot else {}),
                     **{variant: variant_overrides(variant) for variant in variants}},
        "seeds": seeds,
        "data": {"val": base.data.val.urls, "modality": base.data.val.modality},
        "ood": None if ood is None else dataclasses.asdict(ood),
        "mismatched_pairs": None if mismatched_keys is None else len(mismatched_keys),
        "runs": runs,
        "aggregate": aggregate(runs),
        "machine": machine(),
        "versions": versions(),
        # runs reused from an interrupted study keep their own times; this is the invocation's
        "invocation_wall_time_s": time.time() - started,
    }
    write_json(out_dir / "ablation.json", results)
    (out_dir / "ablation.md").write_text(ablation_markdown(results))
    plot_ablation(results, out_dir / "ablation.png")
    return results


def check_same_config(run_dir: Path, config: Config) -> None:
    """A run directory may only be continued or reused with the config it was started from."""
    for path in (run_dir / "config.yaml", run_dir / RUN_RESULT):
        if not path.is_file():
            continue
        found = json.loads(path.read_text())["config"] if path.suffix == ".json" else config_to_dict(load_config(path))
        # a study folder may move: where the run lives is not part of what it is
        differing = _first_difference({**found, "output_dir": None}, {**config_to_dict(config), "output_dir": None})
        if differing is not None:
            raise MmsphereError(f"{str(run_dir)!r} holds a run of another config ({differing}); "
                                "choose another output folder or remove that run")


def _first_difference(found: Any, wanted: Any, prefix: str = "") -> str | None:
    if isinstance(found, dict) and isinstance(wanted, dict):
        for key in sorted(set(found) | set(wanted)):
            difference = _first_difference(found.get(key), wanted.get(key), f"{prefix}{key}.")
            if difference is not None:
                return difference
        return None
    return None if found == wanted else f"{prefix.rstrip('.')}: {found!r} there, {wanted!r} now"


def run_variant(variant: str, seed: int, config: Config, *, ood: OodSets | None = None,
                mismatched_keys: set[str] | None = None, eval_batch_size: int | None = None) -> dict[str, Any]:
    """Train (unless done or ``zero-shot``) and evaluate one variant × seed; returns its record."""
    run_dir = Path(config.output_dir)
    evaluation = evaluation_settings(ood, mismatched_keys)
    if (run_dir / RUN_RESULT).is_file():
        saved = json.loads((run_dir / RUN_RESULT).read_text())
        if saved["evaluation"] == evaluation:
            logger.info("reusing the results in %s", run_dir / RUN_RESULT)
            return saved["record"]
        logger.info("%s was evaluated with other OoD sets or mismatched keys: evaluating it again", run_dir)

    summary: dict[str, Any] = {}
    metrics: dict[str, float] = {}
    if variant == ZERO_SHOT:
        set_seed(seed)  # the initialisation train() starts from with this seed
        model = create_model(config.model)
    else:
        if (run_dir / "summary.json").is_file() and (run_dir / "model.safetensors").is_file():
            logger.info("%s is trained already: evaluating it", run_dir)
        else:
            started = time.time()
            train(config)
            # set-up, the loop, the run's own validation and saving: what a user waits for
            metrics["time/train_call_s"] = time.time() - started
        summary = json.loads((run_dir / "summary.json").read_text())
        # the optimisation loop alone: the cost of the technique
        metrics["time/train_s"] = float(summary["wall_time_s"])
        model = load_run(run_dir)
    model.eval()

    started = time.time()
    evaluated, ood_scores = evaluate_model(model, config, ood=ood, batch_size=eval_batch_size)
    metrics.update(evaluated)
    if variant != ZERO_SHOT and mismatched_keys:
        metrics.update(evaluate_weights(run_dir, mismatched_keys))
    metrics["time/eval_s"] = time.time() - started
    record = {"variant": variant, "seed": seed, "run_dir": str(run_dir), "metrics": metrics,
              "training": {key: value for key, value in summary.items() if key != "validation"}}
    run_dir.mkdir(parents=True, exist_ok=True)
    if ood_scores:
        np.savez(run_dir / OOD_SCORES_FILE, **ood_scores)
    write_json(run_dir / RUN_RESULT, {"config": config_to_dict(config), "evaluation": evaluation, "record": record})
    return record


def machine() -> dict[str, Any]:
    """Where the study ran: CPU cores, accelerator and torch version."""
    accelerator = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return {"cpu_count": os.cpu_count(), "accelerator": accelerator, "torch": torch.__version__,
            "platform": platform.platform()}
