"""``mmsphere score-ood`` / ``python scripts/score_ood.py``: zero-shot OoD detection scoring.

Prints AUROC, AUPR-In, AUPR-Out and FPR@95 per OoD set and their mean, with the convention;
writes a results JSON, a per-sample scores CSV, a ROC-curve PNG and a score-histogram PNG.
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from mmsphere.config import MmsphereError

logger = logging.getLogger(__name__)

ERRORS = (MmsphereError, ValueError, FileNotFoundError)


def main(argv: list[str]) -> int:
    """Score an ID image set against one or more OoD sets with a zero-shot classifier over --classes."""
    from mmsphere.eval.cli import add_model_arguments
    from mmsphere.ood.scores import SCORES

    parser = argparse.ArgumentParser(prog="mmsphere score-ood", description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--id", required=True, metavar="DIR_OR_SHARDS", help="in-distribution images")
    parser.add_argument("--ood", required=True, action="append", metavar="NAME=DIR_OR_SHARDS",
                        help="an OoD set (repeat the option for several)")
    parser.add_argument("--classes", required=True, metavar="FILE", help="ID class names, one per line")
    parser.add_argument("--templates", metavar="FILE", help="prompt templates with {} (default: 'a photo of a {}.')")
    parser.add_argument("--score", choices=SCORES, default="mcm")
    parser.add_argument("--neg-labels", metavar="FILE", help="negative labels for --score neglabel, one per line")
    parser.add_argument("--temperature", type=float,
                        help="logits = cosine / T (default: 1 for mcm, 0.01 for neglabel, 1/logit_scale otherwise)")
    parser.add_argument("--positive", choices=("id", "ood"), default="id",
                        help="FPR@95 convention: id (MCM/CMA, default) or ood (OpenOOD v1.5)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--out", default="ood_results.json",
                        help="results JSON; the CSV and PNGs go beside it (default %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    try:
        results, per_sample = score_ood(args)
    except ERRORS as error:
        print(f"score-ood: error: {error}", file=sys.stderr)
        return 2

    from mmsphere.eval.report import sibling, versions, write_json

    results.update(versions=versions(), command=["score-ood", *argv])
    outputs = {
        "scores_csv": write_scores_csv(sibling(args.out, ".scores.csv"), per_sample),
        "roc_png": plot_roc(sibling(args.out, ".roc.png"), per_sample, args.positive, results),
        "histogram_png": plot_histogram(sibling(args.out, ".hist.png"), per_sample, results),
    }
    results["outputs"] = {name: str(path) for name, path in outputs.items()}
    print(format_results(results))
    print(f"\nresults: {write_json(args.out, results)}")
    for path in outputs.values():
        print(f"         {path}")
    return 0


def score_ood(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Everything but the output files: model, prompts, features, scores and metrics."""
    from mmsphere.eval.cli import load_model
    from mmsphere.ood.inputs import read_names, read_templates
    from mmsphere.ood.metrics import CONVENTIONS, mean_metrics, ood_metrics
    from mmsphere.ood.scores import DEFAULT_TEMPERATURE, cosine_logits, ood_score

    ood_sets = parse_ood_sets(args.ood)
    classes = read_names(args.classes, "classes")
    templates = read_templates(args.templates)
    negatives = None
    if args.score == "neglabel":
        if args.neg_labels is None:
            raise MmsphereError("--score neglabel needs --neg-labels FILE (negative labels, one per line)")
        negatives = read_names(args.neg_labels, "negative labels")
        shared = sorted(set(negatives) & set(classes))
        if shared:
            raise MmsphereError(f"negative labels {shared} are also ID classes in {args.classes!r}")
    elif args.neg_labels is not None:
        raise MmsphereError(f"--neg-labels is only used by --score neglabel, not by --score {args.score}")
    if args.temperature is not None and not args.temperature > 0:
        raise MmsphereError(f"--temperature={args.temperature} must be > 0")

    model, model_identity = load_model(args.run, args.model, args.pretrained, args.device)
    temperature = args.temperature or DEFAULT_TEMPERATURE[args.score] or 1.0 / model_identity["logit_scale"]
    class_features = prompt_features(model, classes, templates)
    negative_features = prompt_features(model, negatives, templates) if negatives else None

    per_sample: dict[str, dict[str, Any]] = {}
    skipped: dict[str, dict[str, int]] = {}
    for name, spec in [("id", args.id), *ood_sets.items()]:
        features, sample_names, labels, skipped[name] = encode_image_set(model, spec, args.batch_size, args.workers,
                                                                        name)
        scores = ood_score(args.score, features, class_features, temperature=temperature,
                           negative_features=negative_features)
        predicted = cosine_logits(features, class_features, 1.0).argmax(dim=1)
        per_sample[name] = {"spec": spec, "names": sample_names, "labels": labels, "scores": scores.numpy(),
                            "predicted": [classes[index] for index in predicted.tolist()]}

    per_set = {name: ood_metrics(per_sample["id"]["scores"], values["scores"], positive=args.positive)
               for name, values in per_sample.items() if name != "id"}
    results: dict[str, Any] = {
        "model": model_identity,
        "score": args.score,
        "temperature": temperature,
        "positive": args.positive,
        "convention": CONVENTIONS[args.positive],
        "metrics": {**per_set, "mean": mean_metrics(per_set)},
        "id": {"spec": args.id, "num_samples": len(per_sample["id"]["names"]),
               "accuracy": id_accuracy(per_sample["id"]["labels"], per_sample["id"]["predicted"], classes),
               "skipped": skipped["id"]},
        "ood": {name: {"spec": ood_sets[name], "num_samples": len(per_sample[name]["names"]), "skipped": skipped[name]}
                for name in ood_sets},
        "classes": {"file": str(Path(args.classes).resolve()), "names": classes},
        "templates": templates,
        "negative_labels": {"file": str(Path(args.neg_labels).resolve()), "count": len(negatives)} if negatives else None,
    }
    return results, per_sample


def parse_ood_sets(specs: list[str]) -> dict[str, str]:
    """``["NAME=DIR_OR_SHARDS", ...]`` -> ``{NAME: DIR_OR_SHARDS}``; names are unique and not 'id'/'mean'."""
    sets: dict[str, str] = {}
    for spec in specs:
        name, separator, location = spec.partition("=")
        name, location = name.strip(), location.strip()
        if not separator or not name or not location:
            raise MmsphereError(f"--ood expects NAME=DIR_OR_SHARDS, got {spec!r}")
        if name in ("id", "mean"):
            raise MmsphereError(f"--ood name {name!r} is reserved; choose another name for {location!r}")
        if name in sets:
            raise MmsphereError(f"--ood name {name!r} is given twice")
        sets[name] = location
    return sets


@torch.inference_mode()
def prompt_features(model: Any, names: list[str], templates: list[str]) -> torch.Tensor:
    """Zero-shot class embeddings (CLIP prompt ensembling): mean of the unit-norm template embeddings, renormalised."""
    from mmsphere.eval.encode import encode_texts

    prompts = [template.format(name) for name in names for template in templates]
    features = encode_texts(model, prompts).view(len(names), len(templates), -1).mean(dim=1)
    return torch.nn.functional.normalize(features, dim=1)


@torch.inference_mode()
def encode_image_set(model: Any, spec: str, batch_size: int, workers: int,
                     set_name: str) -> tuple[torch.Tensor, list[str], list[str | None], dict[str, int]]:
    """Unit-norm features, sample names, folder classes and skip counts of an image folder or image shards."""
    from mmsphere.data.stats import skipped_counts
    from mmsphere.ood.inputs import image_batches

    device = next(model.parameters()).device
    skipped: dict[str, int] = {}
    before = skipped_counts()
    features, names, labels = [], [], []
    batches = image_batches(spec, image_size=model.image_size, image_mean=model.image_mean,
                            image_std=model.image_std, batch_size=batch_size, workers=workers, skipped=skipped)
    for batch in tqdm(batches, desc=f"encoding {set_name}", unit="batch"):
        batch_features = model.encode_image(batch.images.to(device)).float().cpu()
        finite = torch.isfinite(batch_features).all(dim=1)
        if not finite.all():
            raise MmsphereError(f"the model produced non-finite features for {batch.names[int(torch.nonzero(~finite)[0])]!r}"
                                "; its weights may hold NaN/Inf")
        features.append(batch_features)
        names.extend(batch.names)
        labels.extend(batch.classes)
    for reason, count in skipped_counts().items():
        if count - before.get(reason, 0):
            skipped[reason] = skipped.get(reason, 0) + count - before.get(reason, 0)
    if not features:
        raise MmsphereError(f"image set {set_name}={spec!r} produced no image (every sample was skipped: {skipped})")
    return torch.cat(features), names, labels, skipped


def id_accuracy(labels: list[str | None], predicted: list[str], classes: list[str]) -> float | None:
    """Zero-shot top-1 accuracy on the ID set when its folders are named after the classes, else None."""
    if any(label is None or label not in classes for label in labels):
        return None
    return float(np.mean([label == guess for label, guess in zip(labels, predicted)]))


def write_scores_csv(path: Path, per_sample: dict[str, dict[str, Any]]) -> Path:
    """One row per image: set, name (path or key), folder class, score, predicted class."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["set", "is_id", "name", "class", "score", "predicted_class"])
        for set_name, values in per_sample.items():
            for name, label, score, guess in zip(values["names"], values["labels"], values["scores"],
                                                 values["predicted"]):
                writer.writerow([set_name, int(set_name == "id"), name, label or "", repr(float(score)), guess])
    return path


def plot_roc(path: Path, per_sample: dict[str, dict[str, Any]], positive: str, results: dict[str, Any]) -> Path:
    """ROC curve of every OoD set against the ID set, FPR@95 marked."""
    from matplotlib.figure import Figure

    from mmsphere.ood.metrics import roc_curve

    figure = Figure(figsize=(5.5, 5), layout="constrained")
    axes = figure.subplots()
    for name, values in per_sample.items():
        if name == "id":
            continue
        false_positive_rate, true_positive_rate, _ = roc_curve(per_sample["id"]["scores"], values["scores"], positive)
        metrics = results["metrics"][name]
        line, = axes.plot(false_positive_rate, true_positive_rate,
                          label=f"{name}: AUROC {metrics['AUROC']:.3f}, FPR95 {metrics['FPR95']:.3f}")
        axes.plot([metrics["FPR95"]], [0.95], "o", color=line.get_color())
    axes.plot([0, 1], [0, 1], ":", color="grey", linewidth=1)
    axes.axhline(0.95, color="grey", linewidth=0.5)
    positive_name = "ID" if positive == "id" else "OoD"
    axes.set(xlabel=f"false positive rate ({'OoD' if positive == 'id' else 'ID'} accepted as {positive_name})",
             ylabel=f"true positive rate ({positive_name} detected)", xlim=(0, 1), ylim=(0, 1.01),
             title=f"{results['score']} (T={results['temperature']:.4g}), positive = {positive_name}")
    axes.legend(loc="lower right", fontsize="small")
    figure.savefig(path, dpi=120)
    return path


def plot_histogram(path: Path, per_sample: dict[str, dict[str, Any]], results: dict[str, Any]) -> Path:
    """Score distributions of the ID set and every OoD set on shared bins (higher = more ID)."""
    from matplotlib.figure import Figure

    every_score = np.concatenate([values["scores"] for values in per_sample.values()])
    bins = np.histogram_bin_edges(every_score, bins=50)
    figure = Figure(figsize=(6.5, 4), layout="constrained")
    axes = figure.subplots()
    for name, values in per_sample.items():
        axes.hist(values["scores"], bins=bins, density=True, histtype="step" if name != "id" else "stepfilled",
                  alpha=0.5 if name == "id" else 1.0, label=f"{name} (n={len(values['scores'])})")
    axes.set(xlabel=f"{results['score']} score (higher = more in-distribution)", ylabel="density",
             title=f"{results['score']} scores, T={results['temperature']:.4g}")
    axes.legend(fontsize="small")
    figure.savefig(path, dpi=120)
    return path


def format_results(results: dict[str, Any]) -> str:
    """The terminal report: per-set and mean metrics (percent) with the convention."""
    from mmsphere.eval.report import format_table
    from mmsphere.ood.metrics import METRIC_KEYS

    rows = []
    for name, metrics in results["metrics"].items():
        count = results["ood"][name]["num_samples"] if name != "mean" else ""
        rows.append([name, *(100.0 * metrics[key] for key in METRIC_KEYS), count])
    identity = results["id"]
    accuracy = f", zero-shot accuracy {100 * identity['accuracy']:.2f}%" if identity["accuracy"] is not None else ""
    skipped = {name: counts for name, counts in [("id", identity["skipped"])] +
               [(name, values["skipped"]) for name, values in results["ood"].items()] if counts}
    lines = [
        f"OoD detection: score {results['score']} (T={results['temperature']:.4g}), "
        f"ID {identity['spec']} ({identity['num_samples']} images{accuracy}), {len(results['classes']['names'])} classes",
        format_table(["OoD set", "AUROC %", "AUPR-In %", "AUPR-Out %", "FPR@95 %", "images"], rows),
        f"convention: {results['convention']}",
    ]
    if skipped:
        lines.append(f"skipped samples: {skipped}")
    return "\n".join(lines)
