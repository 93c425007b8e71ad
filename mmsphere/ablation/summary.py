"""An ablation's results summarised: mean ± sample std over seeds, the markdown report and the R@1/AUROC plot."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from mmsphere.ablation.variants import ZERO_SHOT
from mmsphere.ood.metrics import CONVENTIONS

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
        "`ablation.json`. Retrieval ties count against the query (ARCHITECTURE.md, Evaluation conventions).",
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
        lines.append(f"| {variant} | {label or ', '.join(_term_label(name, value) for name, value in terms.items())} | "
                     f"{'–' if variant == ZERO_SHOT else ('on' if meta else 'off')} |")
    lines += ["", "## Retrieval (validation set)", "", *markdown_table(variants, aggregated, RETRIEVAL_COLUMNS)]
    if results["ood"] is not None and not results["ood"]["ood_images"]:
        lines += ["", f"## ID accuracy (prompt classification of {', '.join(results['ood']['classes'])})", "",
                  *markdown_table(variants, aggregated, [("ood/id_accuracy", "ID accuracy", 3)])]
    elif results["ood"] is not None:
        ood_columns = [(f"ood/{score}/mean/{key}", f"{score} {label}", 3) for score in results["ood"]["scores"]
                       for key, label in (("AUROC", "AUROC"), ("FPR95", "FPR@95"))]
        lines += ["", f"## OoD detection (mean over {', '.join(results['ood']['ood_images'])}; ID classes "
                      f"{', '.join(results['ood']['classes'])})", "",
                  *markdown_table(variants, aggregated, ood_columns), "",
                  f"Convention: {CONVENTIONS[results['ood']['positive']]}."]
    if results["mismatched_pairs"]:
        lines += ["", f"## Learned weights: clean vs {results['mismatched_pairs']} mismatched pairs", "",
                  "A pair's weight is its mean over the second half of training; clean = positive class.", "",
                  *markdown_table([variant for variant in variants if any(key.startswith("weights/")
                                                                          for key in aggregated.get(variant, {}))],
                                  aggregated, WEIGHT_COLUMNS)]
    lines += ["", "## Geometry (validation set)", "", *markdown_table(variants, aggregated, GEOMETRY_COLUMNS),
              "", "![every seed's R@1](ablation.png)", ""]
    return "\n".join(lines)


def markdown_table(variants: Sequence[str], aggregated: dict[str, Any],
                   columns: Sequence[tuple[str, str, int]]) -> list[str]:
    """Rows of a markdown table: one variant per row, one ``(key, header, decimals)`` column each, mean ± std."""
    rows = [f"| variant | {' | '.join(header for _, header, _ in columns)} |", "|---" * (len(columns) + 1) + "|"]
    for variant in variants:
        cells = [format_mean_std(aggregated.get(variant, {}).get(key), decimals) for key, _, decimals in columns]
        rows.append(f"| {variant} | {' | '.join(cells)} |")
    return rows


def _term_label(name: str, value: Any) -> str:
    """``cma 0.001`` for a bare weight, ``siglip 1 (margin=0.1)`` for a term given as ``{weight, <fields>}``."""
    if not isinstance(value, dict):
        return f"{name} {value:g}"
    fields = ", ".join(f"{key}={field}" for key, field in value.items() if key != "weight")
    return f"{name} {value.get('weight', 1.0):g}" + (f" ({fields})" if fields else "")


def _compute_seconds(runs: Sequence[dict[str, Any]]) -> float:
    return sum(run["metrics"].get("time/train_call_s", 0.0) + run["metrics"]["time/eval_s"] for run in runs)


def plot_ablation(results: dict[str, Any], path: str | os.PathLike) -> Path:
    """Bars of the mean R@1 per variant and direction (± std), every seed as a dot; OoD AUROC beside when present."""
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
