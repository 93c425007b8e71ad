"""What an OoD evaluation reports: the results a card records, a per-sample scores CSV, a ROC and a histogram PNG."""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mmsphere.eval.report import sibling
from mmsphere.ood.evaluate import OodEvaluation
from mmsphere.ood.metrics import roc_curve
from mmsphere.ood.protocols import OodProtocol


def ood_results(evaluation: OodEvaluation, model: dict[str, Any], protocol: OodProtocol | None, id_spec: str,
                ood_specs: Mapping[str, Any], *, sets_missing: Mapping[str, Any] | None = None,
                classes_file: str | os.PathLike | None = None,
                negative_labels_file: str | os.PathLike | None = None) -> dict[str, Any]:
    """What a results card records of an evaluation: model, protocol (or "custom"), settings, metrics, every set.

    ``id_spec`` / ``ood_specs``: where the sets were read from; ``sets_missing``: a protocol's sets not
    found (evaluated without them); the files the class names and negative labels came from, if any.
    """
    samples = evaluation.per_sample
    custom = {"name": "custom", "version": None, "description": "ID and OoD sets given"}
    return {
        "model": model,
        "protocol": protocol.summary() if protocol is not None else custom,
        "score": evaluation.score,
        "temperature": evaluation.temperature,
        "positive": evaluation.positive,
        "convention": evaluation.convention,
        "metrics": evaluation.metrics,
        "group_means": evaluation.group_means,
        "id": {"spec": id_spec, "role": "id", "num_samples": len(samples["id"].names),
               "accuracy": evaluation.id_accuracy, "skipped": samples["id"].skipped, "media": samples["id"].media,
               **samples["id"].completeness},
        "ood": {name: {"spec": spec, "role": samples[name].role, "num_samples": len(samples[name].names),
                       "skipped": samples[name].skipped, "media": samples[name].media, **samples[name].completeness}
                for name, spec in ood_specs.items()},
        "sets_missing": sorted(sets_missing or {}),
        "classes": {"file": str(Path(classes_file).resolve()) if classes_file else None, "names": evaluation.classes},
        "templates": evaluation.templates,
        "negative_labels": ({"file": str(Path(negative_labels_file).resolve()) if negative_labels_file else None,
                             "count": len(evaluation.negative_labels)} if evaluation.negative_labels else None),
    }


def write_ood_report(results_path: str | os.PathLike, evaluation: OodEvaluation) -> dict[str, Path]:
    """Write ``<results>.scores.csv``, ``<results>.roc.png`` and ``<results>.hist.png`` beside the results JSON."""
    return {
        "scores_csv": write_scores_csv(sibling(results_path, ".scores.csv"), evaluation),
        "roc_png": plot_roc(sibling(results_path, ".roc.png"), evaluation),
        "histogram_png": plot_histogram(sibling(results_path, ".hist.png"), evaluation),
    }


def write_scores_csv(path: Path, evaluation: OodEvaluation) -> Path:
    """One row per image: set, name (path or key), folder class, score, predicted class."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["set", "is_id", "name", "class", "score", "predicted_class"])
        for set_name, values in evaluation.per_sample.items():
            for name, label, score, guess in zip(values.names, values.labels, values.scores, values.predicted):
                writer.writerow([set_name, int(set_name == "id"), name, label or "", repr(float(score)), guess])
    return path


def plot_roc(path: Path, evaluation: OodEvaluation) -> Path:
    """ROC curve of every OoD set against the ID set, FPR@95 marked."""
    from matplotlib.figure import Figure  # lazy: matplotlib is a slow import, needed only when plotting

    positive = evaluation.positive
    figure = Figure(figsize=(5.5, 5), layout="constrained")
    axes = figure.subplots()
    id_scores = evaluation.per_sample["id"].scores
    for name, values in evaluation.per_sample.items():
        if name == "id":
            continue
        false_positive_rate, true_positive_rate, _ = roc_curve(id_scores, values.scores, positive)
        metrics = evaluation.metrics[name]
        line, = axes.plot(false_positive_rate, true_positive_rate,
                          label=f"{name}: AUROC {metrics['AUROC']:.3f}, FPR95 {metrics['FPR95']:.3f}")
        axes.plot([metrics["FPR95"]], [0.95], "o", color=line.get_color())
    axes.plot([0, 1], [0, 1], ":", color="grey", linewidth=1)
    axes.axhline(0.95, color="grey", linewidth=0.5)
    positive_name = "ID" if positive == "id" else "OoD"
    axes.set(xlabel=f"false positive rate ({'OoD' if positive == 'id' else 'ID'} accepted as {positive_name})",
             ylabel=f"true positive rate ({positive_name} detected)", xlim=(0, 1), ylim=(0, 1.01),
             title=f"{evaluation.score} (T={evaluation.temperature:.4g}), positive = {positive_name}")
    axes.legend(loc="lower right", fontsize="small")
    figure.savefig(path, dpi=120)
    return path


def plot_histogram(path: Path, evaluation: OodEvaluation) -> Path:
    """Score distributions of the ID set and every OoD set on shared bins (higher = more ID)."""
    from matplotlib.figure import Figure  # lazy: matplotlib is a slow import, needed only when plotting

    every_score = np.concatenate([values.scores for values in evaluation.per_sample.values()])
    bins = np.histogram_bin_edges(every_score, bins=50)
    figure = Figure(figsize=(6.5, 4), layout="constrained")
    axes = figure.subplots()
    for name, values in evaluation.per_sample.items():
        axes.hist(values.scores, bins=bins, density=True, histtype="step" if name != "id" else "stepfilled",
                  alpha=0.5 if name == "id" else 1.0, label=f"{name} (n={len(values.scores)})")
    axes.set(xlabel=f"{evaluation.score} score (higher = more in-distribution)", ylabel="density",
             title=f"{evaluation.score} scores, T={evaluation.temperature:.4g}")
    axes.legend(fontsize="small")
    figure.savefig(path, dpi=120)
    return path
