"""``mmsphere score-ood`` / ``python scripts/score_ood.py``: zero-shot OoD detection scoring.

Prints AUROC, AUPR-In, AUPR-Out and FPR@95 per OoD set and their mean, with the convention;
writes a results JSON, a per-sample scores CSV, a ROC-curve PNG and a score-histogram PNG.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from mmsphere.cli_errors import ArgumentParser, non_negative_int, positive_int, run_cli
from mmsphere.config import ConfigError
from mmsphere.eval.cli import add_model_arguments
from mmsphere.eval.report import format_table, versions, write_json
from mmsphere.ood.evaluate import OodEvaluation, evaluate_ood, read_prompts
from mmsphere.ood.inputs import parse_ood_sets
from mmsphere.ood.metrics import METRIC_KEYS
from mmsphere.ood.report import write_ood_report
from mmsphere.ood.scores import SCORES

logger = logging.getLogger(__name__)


def main(argv: list[str]) -> int:
    """Score an ID image set against one or more OoD sets with a zero-shot classifier over --classes."""
    parser = ArgumentParser(prog="mmsphere score-ood", description=__doc__.splitlines()[0])
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
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--workers", type=non_negative_int, default=0)
    parser.add_argument("--out", default="ood_results.json",
                        help="results JSON; the CSV and PNGs go beside it (default %(default)s)")
    return run_cli(parser, argv, lambda args: run_scoring(args, argv))


def run_scoring(args: argparse.Namespace, argv: list[str]) -> int:
    """Score, print the table and write the results JSON, the per-sample CSV and the plots."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    results, evaluation = score_ood(args)

    results.update(versions=versions(), command=["score-ood", *argv])
    outputs = write_ood_report(args.out, evaluation)
    results["outputs"] = {name: str(path) for name, path in outputs.items()}
    print(format_results(results))
    print(f"\nresults: {write_json(args.out, results)}")
    for path in outputs.values():
        print(f"         {path}")
    return 0


def score_ood(args: argparse.Namespace) -> tuple[dict[str, Any], OodEvaluation]:
    """The arguments checked, the model loaded and :func:`evaluate_ood` run; the results JSON without outputs."""
    # lazy: run_dir imports open_clip via mmsphere.models (seconds); keeps `--help` fast
    from mmsphere.models.run_dir import load_dual_encoder

    # inputs are read and checked before the model loads, so a typo fails in a second
    ood_sets = parse_ood_sets(args.ood)
    if args.score == "neglabel" and args.neg_labels is None:
        raise ConfigError("--score neglabel needs --neg-labels FILE (negative labels, one per line)")
    if args.score != "neglabel" and args.neg_labels is not None:
        raise ConfigError(f"--neg-labels is only used by --score neglabel, not by --score {args.score}")
    prompts = read_prompts(args.classes, args.templates, args.neg_labels, args.score)
    if args.temperature is not None and not args.temperature > 0:
        raise ConfigError(f"--temperature={args.temperature} must be > 0")

    model, model_identity = load_dual_encoder(args.run, args.model, args.pretrained, args.device)
    evaluation = evaluate_ood(model, args.id, ood_sets, prompts.classes, prompts.templates, score=args.score,
                              temperature=args.temperature, positive=args.positive,
                              negative_labels=prompts.negative_labels, batch_size=args.batch_size,
                              workers=args.workers)
    samples = evaluation.per_sample
    results: dict[str, Any] = {
        "model": model_identity,
        "score": evaluation.score,
        "temperature": evaluation.temperature,
        "positive": evaluation.positive,
        "convention": evaluation.convention,
        "metrics": evaluation.metrics,
        "id": {"spec": args.id, "num_samples": len(samples["id"].names), "accuracy": evaluation.id_accuracy,
               "skipped": samples["id"].skipped},
        "ood": {name: {"spec": ood_sets[name], "num_samples": len(samples[name].names),
                       "skipped": samples[name].skipped} for name in ood_sets},
        "classes": {"file": str(Path(args.classes).resolve()), "names": evaluation.classes},
        "templates": evaluation.templates,
        "negative_labels": ({"file": str(Path(args.neg_labels).resolve()), "count": len(evaluation.negative_labels)}
                            if evaluation.negative_labels else None),
    }
    return results, evaluation


def format_results(results: dict[str, Any]) -> str:
    """The terminal report: per-set and mean metrics (percent) with the convention."""
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
