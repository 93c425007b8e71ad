"""Ablations: variants of one base config trained on the same model, data, steps and seeds, then compared.

A variant is a few overrides of the base config (:func:`variants`, read from the term registry); a technique
that adds one term also takes another weight as ``TECHNIQUE@WEIGHT`` (``cma@0.1``). For every
variant and seed, :func:`run_ablation` fine-tunes into ``OUT/VARIANT/seed_S``, evaluates the saved
run on ``data.val`` (retrieval in both directions and the embedding geometry), OoD detection when
:class:`OodSets` are given, and how well the learned sample weights single out mismatched pairs
when their keys are known. ``OUT/ablation.json`` holds every run's numbers, ``OUT/ablation.md`` the
mean ± sample standard deviation over seeds per variant with the training time, ``OUT/ablation.png``
every seed's R@1. A study that was interrupted continues where it stopped: a run with results is
reused, a run with checkpoints resumes, and a run directory trained from another config is an error.

    python scripts/ablate.py --config configs/demo.yaml --variants clip,margin,meta --seeds 3 --out runs/ablation
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmsphere.config import Config, ConfigError, MmsphereError, config_from_dict, config_to_dict, load_config
from mmsphere.ood.inputs import DEFAULT_TEMPLATES

logger = logging.getLogger(__name__)

BASELINE_TERM = "angular_margin"  # the contrastive term the techniques are added to (MAMA's)
# older command-line spellings of two variants
ALIASES = {"margin": "angular_margin", "calunif": "calibrated_uniformity"}


def variants() -> dict[str, dict[str, Any]]:
    """The variants, read from the term registry (data, not code): every registered term and meta weighting.

    A contrastive term alone; any other term at its default weight on top of the baseline's
    angular margin; ``meta``: the baseline with meta weighting; ``all``: every non-contrastive
    term and meta weighting on the baseline. A term that needs the SigLIP bias gets the model's.
    """
    from mmsphere.losses.terms import TERMS  # the registry needs torch; imported when variants are built

    baseline = {BASELINE_TERM: TERMS[BASELINE_TERM].default_weight}
    extras = {name: term.default_weight for name, term in TERMS.items() if not term.contrastive}
    found: dict[str, dict[str, Any]] = {}
    for name, term in TERMS.items():
        terms = {name: term.default_weight} if term.contrastive else {**baseline, name: term.default_weight}
        found[name] = {"loss.terms": terms, "meta.enabled": False}
        if term.needs_logit_bias:
            found[name]["model.init_logit_bias"] = -10.0
    found["meta"] = {"loss.terms": dict(baseline), "meta.enabled": True}
    found["all"] = {"loss.terms": {**baseline, **extras}, "meta.enabled": True}
    return found


def _canonical(name: str) -> str:
    return ALIASES.get(name, name)


ZERO_SHOT = "zero-shot"  # the model before fine-tuning, as each seed initialises it
OOD_SCORES = ("mcm", "msp", "maxlogit", "energy")  # NegLabel needs negative labels: not offered here
RUN_RESULT = "ablation_run.json"
OOD_SCORES_FILE = "ood_scores.npz"

# (metric key, column header, decimals) of the markdown tables
RETRIEVAL_COLUMNS = [("t2v/R@1", "t2v R@1", 1), ("t2v/R@5", "t2v R@5", 1), ("t2v/MnR", "t2v MnR", 1),
                     ("v2t/R@1", "v2t R@1", 1), ("v2t/R@5", "v2t R@5", 1), ("v2t/MnR", "v2t MnR", 1),
                     ("time/train_s", "train loop (s)", 1)]
GEOMETRY_COLUMNS = [("geometry/alignment", "alignment", 3), ("geometry/uniformity_union", "uniformity (union)", 3),
                    ("geometry/modality_gap", "modality gap", 3),
                    ("geometry/mean_positive_angle", "positive angle (°)", 1),
                    ("geometry/mean_negative_angle", "negative angle (°)", 1)]
WEIGHT_COLUMNS = [("weights/auroc_clean_vs_mismatched", "AUROC clean vs mismatched", 3),
                  ("weights/mean_weight_clean", "mean weight, clean", 3),
                  ("weights/mean_weight_mismatched", "mean weight, mismatched", 3)]


@dataclasses.dataclass
class OodSets:
    """ID and OoD image sets (folders or image shards) and the ID class names of the zero-shot classifier."""

    id_images: str
    ood_images: dict[str, str]
    classes: list[str]
    templates: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_TEMPLATES))
    scores: tuple[str, ...] = ("mcm", "energy")
    positive: str = "id"  # FPR@95 convention (DESIGN §4)

    def check(self) -> None:
        """Raise naming the first impossible field; local folders and shards must exist."""
        from mmsphere.train.preflight import local_shard_paths

        if not self.ood_images:
            raise MmsphereError("OoD evaluation needs at least one OoD image set (--ood NAME=DIR_OR_SHARDS)")
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise MmsphereError(f"OoD evaluation needs at least 2 distinct ID classes, got {self.classes}")
        unknown = [score for score in self.scores if score not in OOD_SCORES]
        if unknown or not self.scores:
            raise MmsphereError(f"OoD scores {unknown or '(none)'} are not available here; choose from {OOD_SCORES}")
        if self.positive not in ("id", "ood"):
            raise MmsphereError(f"positive={self.positive!r} must be 'id' or 'ood'")
        for name, spec in [("id", self.id_images), *self.ood_images.items()]:
            if Path(spec).is_dir():
                continue
            try:
                paths = local_shard_paths(spec)
            except ValueError:  # a glob that matches no file
                paths = [spec]
            if paths is not None and not all(Path(path).is_file() for path in paths):
                raise FileNotFoundError(f"OoD image set {name}={spec!r} is neither a folder nor existing shards")


# --------------------------------------------------------------------------------------------
# the study


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
    from mmsphere.eval.report import versions, write_json
    from mmsphere.train.preflight import check_data_sources

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
        plan = [(ZERO_SHOT, seed, _seeded(base, seed, out_dir / ZERO_SHOT / f"seed_{seed}")) for seed in seeds] + plan
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


def checked_variants(names: Sequence[str]) -> list[str]:
    """The variant names in order; unknown, malformed or repeated names are an error."""
    names = [name.strip() for name in names]
    known = variants()
    unknown = [name for name in names if _canonical(name.partition("@")[0]) not in known]
    if unknown or not names:
        raise ConfigError(f"unknown variant(s) {unknown or '(none given)'}; known: {', '.join(known)} "
                          f"(a non-contrastive term also as NAME@WEIGHT)")
    for name in names:
        variant_overrides(name)
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(f"variant(s) {repeated} are listed more than once")
    return names


def checked_seeds(seeds: Sequence[int]) -> list[int]:
    """Distinct integer seeds, at least one."""
    seeds = list(seeds)
    if not seeds or any(isinstance(seed, bool) or not isinstance(seed, int) for seed in seeds):
        raise ConfigError(f"seeds={seeds} must be one or more integers")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds={seeds} holds repeats")
    return seeds


def variant_overrides(variant: str) -> dict[str, Any]:
    """The config overrides of a variant (see :func:`variants`), or of ``TERM@WEIGHT`` with that term's weight."""
    from mmsphere.losses.terms import TERMS

    name, at, weight_text = variant.partition("@")
    known = variants()
    if _canonical(name) not in known:
        raise ConfigError(f"unknown variant {variant!r}; known: {', '.join(known)}")
    name = _canonical(name)
    overrides = copy.deepcopy(known[name])
    if at:
        if name not in TERMS or TERMS[name].contrastive:
            extras = [term for term, term_class in TERMS.items() if not term_class.contrastive]
            raise ConfigError(f"variant {variant!r}: only the terms added to the baseline ({', '.join(extras)}) "
                              "take @WEIGHT (the weight of the one term they add)")
        try:
            weight = float(weight_text)
        except ValueError:
            raise ConfigError(f"variant {variant!r}: weight {weight_text!r} is not a number") from None
        if not (math.isfinite(weight) and weight > 0):
            raise ConfigError(f"variant {variant!r}: weight {weight_text!r} must be a finite number > 0")
        overrides["loss.terms"][name] = weight
    return overrides


def variant_config(base: Config, variant: str, seed: int, output_dir: str | os.PathLike) -> Config:
    """``base`` with the variant's overrides, ``seed`` and ``output_dir``; resumes the run it finds there."""
    raw = config_to_dict(base)
    for key, value in variant_overrides(variant).items():
        section, _, name = key.partition(".")
        raw[section][name] = value
    raw.update(output_dir=str(output_dir), seed=seed)
    raw["train"]["resume"] = "latest"  # an interrupted study continues from the last checkpoint
    try:
        return config_from_dict(raw)
    except ConfigError as error:
        raise ConfigError(f"variant {variant!r}: {error}") from None


def _seeded(base: Config, seed: int, output_dir: Path) -> Config:
    raw = config_to_dict(base)
    raw.update(output_dir=str(output_dir), seed=seed)
    return config_from_dict(raw)


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


# --------------------------------------------------------------------------------------------
# one run


def run_variant(variant: str, seed: int, config: Config, *, ood: OodSets | None = None,
                mismatched_keys: set[str] | None = None, eval_batch_size: int | None = None) -> dict[str, Any]:
    """Train (unless done or ``zero-shot``) and evaluate one variant × seed; returns its record."""
    from accelerate.utils import set_seed

    from mmsphere.demo import weight_separation
    from mmsphere.eval.report import write_json
    from mmsphere.models import create_model, load_run
    from mmsphere.train import train

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
        separation = weight_separation(run_dir / "sample_weights.jsonl", mismatched_keys)
        if separation is not None:
            metrics.update({f"weights/{key}": float(value) for key, value in separation.items() if key != "per_key"})
    metrics["time/eval_s"] = time.time() - started
    record = {"variant": variant, "seed": seed, "run_dir": str(run_dir), "metrics": metrics,
              "training": {key: value for key, value in summary.items() if key != "validation"}}
    run_dir.mkdir(parents=True, exist_ok=True)
    if ood_scores:
        np.savez(run_dir / OOD_SCORES_FILE, **ood_scores)
    write_json(run_dir / RUN_RESULT, {"config": config_to_dict(config), "evaluation": evaluation, "record": record})
    return record


def evaluation_settings(ood: OodSets | None, mismatched_keys: set[str] | None) -> dict[str, Any]:
    """What a run's evaluation depended on besides its config (a saved result is reused only under the same)."""
    keys_digest = None
    if mismatched_keys:
        keys_digest = hashlib.sha256("\n".join(sorted(mismatched_keys)).encode()).hexdigest()
    settings = {"ood": None if ood is None else dataclasses.asdict(ood), "mismatched_keys_sha256": keys_digest}
    return json.loads(json.dumps(settings))  # as it reads back from the saved file (tuples become lists)


@torch.inference_mode()
def evaluate_model(model: torch.nn.Module, config: Config, *, ood: OodSets | None = None,
                   batch_size: int | None = None) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Flat metrics (``t2v/R@1``, ``geometry/...``, ``ood/<score>/<set>/AUROC``) and the per-sample OoD scores."""
    from mmsphere.eval.evaluate import evaluate_retrieval_loader

    batch_size = batch_size or config.train.batch_size
    metrics = evaluate_retrieval_loader(model, config.data.val.urls, modality=config.data.val.modality,
                                        frames=config.data.frames, batch_size=batch_size, progress=False)
    metrics = {key: float(value) for key, value in metrics.items()}
    scores: dict[str, np.ndarray] = {}
    if ood is not None:
        ood_metrics_found, scores = evaluate_ood(model, ood, batch_size=batch_size)
        metrics.update(ood_metrics_found)
    return metrics, scores


def evaluate_ood(model: torch.nn.Module, ood: OodSets, *,
                 batch_size: int) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """OoD metrics per score and set (and their mean over sets), plus the scores as ``{"<score>/<set>": [N]}``."""
    from mmsphere.ood.evaluate import encode_image_set
    from mmsphere.ood.evaluate import evaluate_ood as evaluate_ood_sets

    # every image is encoded once, then scored by each score (at its default temperature)
    features = {name: encode_image_set(model, spec, batch_size, 0, name)[0]
                for name, spec in [("id", ood.id_images), *ood.ood_images.items()]}
    metrics: dict[str, float] = {}
    scores: dict[str, np.ndarray] = {}
    for score in ood.scores:
        evaluation = evaluate_ood_sets(model, features["id"], {name: features[name] for name in ood.ood_images},
                                       ood.classes, ood.templates, score=score, positive=ood.positive)
        scores.update({f"{score}/{name}": values.scores for name, values in evaluation.per_sample.items()})
        for set_name, values in evaluation.metrics.items():
            metrics.update({f"ood/{score}/{set_name}/{key}": float(value) for key, value in values.items()})
    return metrics, scores


# --------------------------------------------------------------------------------------------
# summaries


def aggregate(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per variant and metric: ``mean``, sample standard deviation ``std`` (n − 1; None for one seed) and ``n``."""
    grouped: dict[str, dict[str, list[float]]] = {}
    for run in runs:
        per_metric = grouped.setdefault(run["variant"], {})
        for key, value in run["metrics"].items():
            if value is not None and math.isfinite(value):
                per_metric.setdefault(key, []).append(float(value))
    return {variant: {key: mean_and_std(values) for key, values in per_metric.items()}
            for variant, per_metric in grouped.items()}


def mean_and_std(values: Sequence[float]) -> dict[str, Any]:
    """``{"mean", "std", "n"}`` of seed values; ``std`` is the sample standard deviation (None below 2 values)."""
    array = np.asarray(values, dtype=np.float64)
    return {"mean": float(array.mean()), "std": float(array.std(ddof=1)) if array.size > 1 else None,
            "n": int(array.size)}


def format_mean_std(summary: dict[str, Any] | None, decimals: int) -> str:
    """``"12.3 ± 0.4"``; one value reads ``"12.3 (n=1)"`` and a missing metric ``"–"``."""
    if summary is None:
        return "–"
    if summary["std"] is None:
        return f"{summary['mean']:.{decimals}f} (n={summary['n']})"
    return f"{summary['mean']:.{decimals}f} ± {summary['std']:.{decimals}f}"


def ablation_markdown(results: dict[str, Any]) -> str:
    """The study as markdown: retrieval, OoD, learned weights and geometry tables (mean ± std over seeds)."""
    base = results["base_config"]
    aggregated = results["aggregate"]
    variants = list(results["variants"])
    machine_info = results["machine"]
    lines = [
        f"# Ablation: {sum(variant != ZERO_SHOT for variant in variants)} variants × {len(results['seeds'])} seeds"
        + (" (+ the untrained model)" if ZERO_SHOT in variants else ""), "",
        f"Model `{base['model']['name']}` (pretrained: `{base['model']['pretrained']}`), "
        f"{base['train']['max_steps']} steps of global batch {base['train']['batch_size']}, lr {base['train']['lr']}; "
        f"seeds {results['seeds']}. Evaluated on `{results['data']['val']}` ({results['data']['modality']}).",
        *([f"Command: `{' '.join(results['description']['command'])}`"] if "command" in results["description"] else []),
        "Every cell is the mean ± sample standard deviation (n − 1) over the seeds; every run's numbers are in "
        "`ablation.json`. Retrieval ties count against the query (DESIGN §4).",
        f"Machine: {machine_info['cpu_count']} CPU cores, {machine_info['accelerator']}, torch "
        f"{machine_info['torch']}; training and evaluation took {_compute_seconds(results['runs']):.0f} s summed "
        "over the runs.", "",
        "## Variants", "",
        "| variant | objective terms | meta weighting |", "|---|---|---|",
    ]
    for variant in variants:
        overrides = results["variants"][variant]
        terms = overrides.get("loss.terms", base["loss"]["terms"])
        meta = overrides.get("meta.enabled", base["meta"]["enabled"])
        label = "no fine-tuning: the model each seed's training starts from" if variant == ZERO_SHOT else ""
        lines.append(f"| {variant} | {label or ', '.join(f'{name} {weight:g}' for name, weight in terms.items())} | "
                     f"{'–' if variant == ZERO_SHOT else ('on' if meta else 'off')} |")
    lines += ["", "## Retrieval (validation set)", "", *_table(variants, aggregated, RETRIEVAL_COLUMNS)]
    if results["ood"] is not None:
        from mmsphere.ood.metrics import CONVENTIONS

        ood_columns = [(f"ood/{score}/mean/{key}", f"{score} {label}", 3) for score in results["ood"]["scores"]
                       for key, label in (("AUROC", "AUROC"), ("FPR95", "FPR@95"))]
        lines += ["", f"## OoD detection (mean over {', '.join(results['ood']['ood_images'])}; ID classes "
                      f"{', '.join(results['ood']['classes'])})", "",
                  *_table(variants, aggregated, ood_columns), "",
                  f"Convention: {CONVENTIONS[results['ood']['positive']]}."]
    if results["mismatched_pairs"]:
        lines += ["", f"## Learned weights: clean vs {results['mismatched_pairs']} mismatched pairs", "",
                  "A pair's weight is its mean over the second half of training; clean = positive class.", "",
                  *_table([variant for variant in variants if any(key.startswith("weights/")
                                                                  for key in aggregated.get(variant, {}))],
                          aggregated, WEIGHT_COLUMNS)]
    lines += ["", "## Geometry (validation set)", "", *_table(variants, aggregated, GEOMETRY_COLUMNS),
              "", "![every seed's R@1](ablation.png)", ""]
    return "\n".join(lines)


def _compute_seconds(runs: Sequence[dict[str, Any]]) -> float:
    return sum(run["metrics"].get("time/train_call_s", 0.0) + run["metrics"]["time/eval_s"] for run in runs)


def _table(variants: Sequence[str], aggregated: dict[str, Any], columns: Sequence[tuple[str, str, int]]) -> list[str]:
    rows = [f"| variant | {' | '.join(header for _, header, _ in columns)} |", "|---" * (len(columns) + 1) + "|"]
    for variant in variants:
        cells = [format_mean_std(aggregated.get(variant, {}).get(key), decimals) for key, _, decimals in columns]
        rows.append(f"| {variant} | {' | '.join(cells)} |")
    return rows


def plot_ablation(results: dict[str, Any], path: str | os.PathLike) -> Path:
    """Bars of the mean R@1 per variant and direction (± std), every seed as a dot; OoD AUROC beside when present."""
    from matplotlib.figure import Figure

    variants = list(results["variants"])
    panels = [("R@1 (%)", [("t2v/R@1", "text → image"), ("v2t/R@1", "image → text")])]
    if results["ood"] is not None:
        panels.append(("OoD AUROC (mean over sets)",
                       [(f"ood/{score}/mean/AUROC", score) for score in results["ood"]["scores"]]))
    figure = Figure(figsize=(4 + 1.2 * len(variants) * len(panels), 4), layout="constrained")
    for axes, (label, series) in zip(np.atleast_1d(figure.subplots(1, len(panels))), panels):
        width = 0.8 / len(series)
        for offset, (key, name) in enumerate(series):
            positions = np.arange(len(variants)) + (offset - (len(series) - 1) / 2) * width
            summaries = [results["aggregate"].get(variant, {}).get(key) for variant in variants]
            means = [summary["mean"] if summary else np.nan for summary in summaries]
            errors = [summary["std"] or 0.0 if summary else 0.0 for summary in summaries]
            bars = axes.bar(positions, means, width, yerr=errors, capsize=3, alpha=0.6, label=name)
            for position, variant in zip(positions, variants):
                values = [run["metrics"][key] for run in results["runs"]
                          if run["variant"] == variant and key in run["metrics"]]
                axes.plot([position] * len(values), values, "o", color=bars.patches[0].get_facecolor(),
                          markersize=3, alpha=1.0)
        axes.set_xticks(np.arange(len(variants)), variants, rotation=30, ha="right")
        axes.set_ylim(bottom=0)
        axes.set(ylabel=label, title=f"{label}: mean ± std, dots = seeds")
        axes.legend(fontsize="small")
    path = Path(path)
    figure.savefig(path, dpi=120)
    return path


def machine() -> dict[str, Any]:
    """Where the study ran: CPU cores, accelerator and torch version."""
    accelerator = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return {"cpu_count": os.cpu_count(), "accelerator": accelerator, "torch": torch.__version__,
            "platform": platform.platform()}


# --------------------------------------------------------------------------------------------
# command line


def read_mismatched_keys(path: str | os.PathLike) -> set[str]:
    """Keys of mismatched pairs from a demo ``meta.json`` (``mismatched_keys``), a JSON list or one key per line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mismatched-keys file {str(path)!r} does not exist")
    text = path.read_text()
    if path.suffix == ".json":
        try:
            content = json.loads(text)
        except json.JSONDecodeError as error:
            raise MmsphereError(f"{str(path)!r} is not valid JSON: {error}") from None
        keys = content.get("mismatched_keys") if isinstance(content, dict) else content
        if not isinstance(keys, list) or not all(isinstance(key, str) for key in keys):
            raise MmsphereError(f"{str(path)!r} must hold a list of keys or an object with 'mismatched_keys'")
        return set(keys)
    return {line.strip() for line in text.splitlines() if line.strip()}


def main(argv: list[str] | None = None) -> int:
    """``python scripts/ablate.py --config BASE.yaml --variants ... --seeds N --out DIR [overrides...]``."""
    parser = argparse.ArgumentParser(prog="python scripts/ablate.py", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="base training config (YAML)")
    parser.add_argument("--variants", default="clip,margin,meta,m2mix,calunif,cma,all",
                        help="comma-separated variants: every registered term (a contrastive one alone, any other "
                             "on the angular-margin baseline), meta, all; margin and calunif are short for "
                             "angular_margin and calibrated_uniformity; a non-contrastive term also as NAME@WEIGHT, "
                             "e.g. cma@0.1 (default: %(default)s)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per variant: base seed, +1, ... (default 3)")
    parser.add_argument("--out", required=True, help="output folder: OUT/VARIANT/seed_S runs, ablation.json/.md/.png")
    parser.add_argument("--zero-shot", action="store_true", help="add a row for the untrained model of each seed")
    parser.add_argument("--ood-id", metavar="DIR_OR_SHARDS", help="in-distribution images for OoD evaluation")
    parser.add_argument("--ood", action="append", default=[], metavar="NAME=DIR_OR_SHARDS", help="an OoD set (repeat)")
    parser.add_argument("--classes", metavar="FILE", help="ID class names, one per line")
    parser.add_argument("--templates", metavar="FILE", help="prompt templates with {} (default 'a photo of a {}.')")
    parser.add_argument("--ood-scores", default="mcm,energy", help=f"comma-separated, of {', '.join(OOD_SCORES)}")
    parser.add_argument("--ood-positive", choices=("id", "ood"), default="id", help="FPR@95 convention (default id)")
    parser.add_argument("--mismatched-keys", metavar="FILE",
                        help="keys of mismatched pairs (demo meta.json, JSON list or lines): AUROC of learned weights")
    parser.add_argument("--eval-batch-size", type=int, help="evaluation batch size (default train.batch_size)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides of the base config")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)  # one line per run: which variant and seed, and where

    try:
        if args.seeds < 1:
            raise ConfigError(f"--seeds={args.seeds} must be >= 1")
        base = load_config(args.config, args.overrides)
        results = run_ablation(
            base, args.variants.split(","), [base.seed + index for index in range(args.seeds)], args.out,
            zero_shot=args.zero_shot, ood=_ood_sets(args), eval_batch_size=args.eval_batch_size,
            mismatched_keys=read_mismatched_keys(args.mismatched_keys) if args.mismatched_keys else None,
            description={"command": ["scripts/ablate.py", *argv],
                         "config": str(args.config), "overrides": args.overrides},
        )
    except (MmsphereError, ValueError, FileNotFoundError) as error:
        print(f"ablate: error: {error}", file=sys.stderr)
        return 2
    print("\n".join(_table(list(results["variants"]), results["aggregate"], RETRIEVAL_COLUMNS)))
    print(f"\nresults: {Path(args.out) / 'ablation.md'}, {Path(args.out) / 'ablation.json'}")
    return 0


def _ood_sets(args: argparse.Namespace) -> OodSets | None:
    given = {"--ood-id": args.ood_id, "--ood": args.ood or None, "--classes": args.classes}
    if all(value is None for value in given.values()):
        if args.templates:
            raise MmsphereError("--templates goes with OoD evaluation (--ood-id, --ood and --classes)")
        return None
    missing = [flag for flag, value in given.items() if value is None]
    if missing:
        raise MmsphereError(f"OoD evaluation needs --ood-id, --ood and --classes; missing {', '.join(missing)}")
    from mmsphere.ood.inputs import parse_ood_sets, read_names, read_templates

    return OodSets(id_images=args.ood_id, ood_images=parse_ood_sets(args.ood),
                   classes=read_names(args.classes, "classes"), templates=read_templates(args.templates),
                   scores=tuple(args.ood_scores.split(",")), positive=args.ood_positive)
