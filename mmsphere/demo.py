"""The main job, offline on a CPU: demo data → evaluate → fine-tune with meta weighting → evaluate → report.

``make demo`` runs ``python scripts/demo.py --out runs/demo``. It builds video–text clips of
handwritten digits moving in named directions with a fraction of mismatched captions, measures
retrieval and OoD detection before and after fine-tuning, and shows whether the meta-learned weights
single out the mismatched pairs (AUROC of the weight, clean = positive).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmsphere.train.config import Config, load_config
from mmsphere.data.demo import build_demo_data
from mmsphere.eval.evaluate import evaluate_retrieval
from mmsphere.ood.evaluate import evaluate_ood
from mmsphere.ood.metrics import auroc
from mmsphere.plotting import line_plot, pyplot
from mmsphere.train import train

logger = logging.getLogger(__name__)


def main(argv: list[str]) -> int:
    """``mmsphere demo``: run the whole loop and write ``OUT/report.md``, ``metrics.json`` and plots."""
    parser = argparse.ArgumentParser(prog="mmsphere demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo", help="output folder (default %(default)s)")
    parser.add_argument("--config", default="configs/demo.yaml", help="training config (default %(default)s)")
    parser.add_argument("--mismatch", type=float, default=0.2, help="fraction of mismatched captions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-only", action="store_true",
                        help="only build the data into OUT/data (for studies that train on it themselves)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides of the training config")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.data_only:
        data_meta = build_demo_data(Path(args.out) / "data", seed=args.seed, mismatch_fraction=args.mismatch,
                                    overwrite=True, progress=True)
        print(f"{len(data_meta['mismatched_keys'])} mismatched pairs; data: {Path(args.out) / 'data'}")
        return 0
    report = run_demo(Path(args.out), args.config, mismatch_fraction=args.mismatch, seed=args.seed,
                      overrides=args.overrides)
    print(summary_text(report))
    print(f"\nreport: {Path(args.out) / 'report.md'}")
    return 0


def run_demo(out: Path, config_path: str, *, mismatch_fraction: float = 0.2, seed: int = 0,
             overrides: list[str] | None = None) -> dict[str, Any]:
    """Build the data, evaluate, fine-tune, evaluate again; returns everything ``metrics.json`` holds."""
    # lazy: mmsphere.models imports open_clip (seconds); keeps `mmsphere demo --help` and mmsphere.ablation fast
    from mmsphere.models import create_model, load_run

    started = time.time()
    data_dir, run_dir = out / "data", out / "run"
    data_meta = build_demo_data(data_dir, seed=seed, mismatch_fraction=mismatch_fraction, overwrite=True,
                                progress=True)
    data_seconds = time.time() - started
    splits = data_meta["splits"]
    # what `score_ood.py --classes/--templates` reads, so the README's OoD example runs on the demo
    (out / "id_classes.txt").write_text("\n".join(data_meta["id_class_names"]) + "\n")
    (out / "templates.txt").write_text(data_meta["class_prompt"] + "\n")
    config = load_config(config_path, [
        f"output_dir={run_dir}", f"seed={seed}",
        f"data.train=[{{urls: '{splits['train/video']['urls']}', modality: video, weight: 2.0, name: clips}}, "
        f"{{urls: '{splits['train/image']['urls']}', modality: image, weight: 1.0, name: images}}]",
        f"data.meta={{urls: '{splits['meta']['urls']}', modality: video, name: meta}}",
        f"data.val={{urls: '{splits['val']['urls']}', modality: video, name: val}}",
        *(overrides or []),
    ])
    shutil.rmtree(run_dir, ignore_errors=True)  # the demo always starts afresh

    torch.manual_seed(config.seed)
    before = evaluate(create_model(config.model), config, data_meta)
    train_started = time.time()
    summary = train(config)
    train_seconds = time.time() - train_started
    after = evaluate(load_run(run_dir), config, data_meta)

    weights = weight_separation(run_dir / "sample_weights.jsonl", set(data_meta["mismatched_keys"]))
    plots = {"loss_curve": plot_loss_curve(run_dir / "metrics.jsonl", out / "loss_curve.png"),
             "weighting_curve": str(run_dir / "weighting_curve.png")}
    if weights is not None:
        plots["weights_histogram"] = plot_weight_histogram(weights, out / "weights_mismatched_vs_clean.png")
    report = {
        "config": str(run_dir / "config.yaml"),
        "data": {"dir": str(data_dir), "mismatch_fraction": mismatch_fraction,
                 "mismatched_pairs": len(data_meta["mismatched_keys"]),
                 "splits": {name: split["samples"] for name, split in splits.items()}},
        "before": before,
        "after": after,
        "weights": None if weights is None else {key: value for key, value in weights.items() if key != "per_key"},
        "training": summary,
        "timing_s": {"data": data_seconds, "train": train_seconds, "total": time.time() - started},
        "plots": plots,
    }
    write_report(out, report, config)
    return report


def write_report(out: Path, report: dict[str, Any], config: Config) -> tuple[Path, Path]:
    """Write ``OUT/metrics.json`` (the whole ``report`` dict) and ``OUT/report.md``; returns both paths."""
    metrics_path, markdown_path = Path(out) / "metrics.json", Path(out) / "report.md"
    metrics_path.write_text(json.dumps(report, indent=2))
    markdown_path.write_text(report_markdown(report, config))
    return metrics_path, markdown_path


def evaluate(model: torch.nn.Module, config: Config, data_meta: dict[str, Any]) -> dict[str, Any]:
    """Text–video retrieval on the validation clips and MCM OoD detection on the digit images."""
    model.eval()
    splits = data_meta["splits"]
    retrieval = evaluate_retrieval(model, splits["val"]["urls"], modality="video", frames=config.data.frames,
                                   batch_size=32, progress=False)
    ood = evaluate_ood(model, splits["ood/id"]["urls"], {"ood": splits["ood/ood"]["urls"]},
                       data_meta["id_class_names"], [data_meta["class_prompt"]], score="mcm", temperature=1.0,
                       positive="id").metrics["ood"]
    return {"retrieval": retrieval["metrics"], "geometry": retrieval["geometry"], "ood_mcm": ood}


def weight_separation(path: Path, mismatched: set[str]) -> dict[str, Any] | None:
    """AUROC of the learned weight at telling clean (positive) from mismatched pairs.

    A pair's weight is its mean over the second half of training, when the WeightNet has had
    time to learn; pairs seen only in the first half are left out.
    """
    if not path.is_file() or not mismatched:
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    last_step = max(row["step"] for row in rows)
    per_key: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        if row["step"] > last_step / 2:
            per_key[row["key"]].append(row["weight"])
    clean = np.array([np.mean(values) for key, values in per_key.items() if key not in mismatched])
    noisy = np.array([np.mean(values) for key, values in per_key.items() if key in mismatched])
    if len(clean) == 0 or len(noisy) == 0:
        return None
    return {"auroc_clean_vs_mismatched": auroc(clean, noisy), "clean_pairs": len(clean),
            "mismatched_pairs": len(noisy), "mean_weight_clean": float(clean.mean()),
            "mean_weight_mismatched": float(noisy.mean()), "per_key": {"clean": clean, "mismatched": noisy}}


def plot_loss_curve(metrics_path: Path, path: Path) -> str:
    """Total training loss per logged step."""
    records = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    records = [record for record in records if "loss/total" in record]
    return line_plot([record["step"] for record in records], [record["loss/total"] for record in records], path,
                     xlabel="step", ylabel="training loss")


def plot_weight_histogram(weights: dict[str, Any], path: Path) -> str:
    """Distribution of learned weights, mismatched vs clean pairs."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(5, 3.5))
    bins = np.linspace(0, 1, 41)
    axis.hist(weights["per_key"]["clean"], bins=bins, alpha=0.6, density=True, label="clean pairs")
    axis.hist(weights["per_key"]["mismatched"], bins=bins, alpha=0.6, density=True, label="mismatched pairs")
    axis.set_xlim(min(weights["per_key"]["clean"].min(), weights["per_key"]["mismatched"].min()) - 0.01,
                  max(weights["per_key"]["clean"].max(), weights["per_key"]["mismatched"].max()) + 0.01)
    axis.set_xlabel("learned weight (mean over the second half of training)")
    axis.set_ylabel("density")
    axis.set_title(f"AUROC clean vs mismatched = {weights['auroc_clean_vs_mismatched']:.3f}")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return str(path)


def _retrieval_rows(label: str, metrics: dict[str, dict[str, float]]) -> list[str]:
    return [f"| {label} | {direction} | {values['R@1']:.1f} | {values['R@5']:.1f} | {values['R@10']:.1f} | "
            f"{values['MdR']:.1f} | {values['MnR']:.1f} |" for direction, values in metrics.items()]


def report_markdown(report: dict[str, Any], config: Config) -> str:
    """The human-readable report of a demo run."""
    weights = report["weights"]
    lines = [
        "# mmsphere demo report", "",
        f"Data: {report['data']['splits']} samples per split in `{report['data']['dir']}`, "
        f"{report['data']['mismatch_fraction']:.0%} of training captions deliberately mismatched "
        f"({report['data']['mismatched_pairs']} pairs).",
        f"Model `{config.model.name}`, temporal head `{config.model.temporal_head}`, {config.data.frames} frames; "
        f"objective terms {config.loss.terms}; meta weighting "
        f"{'on, interval ' + str(config.meta.interval) if config.meta.enabled else 'off'}; "
        f"{report['training']['steps']} steps of global batch {config.train.batch_size}.",
        f"Time: data {report['timing_s']['data']:.0f} s, training {report['timing_s']['train']:.0f} s, "
        f"total {report['timing_s']['total']:.0f} s.", "",
        "## Text–video retrieval (validation clips, ties count against the query)", "",
        "| model | direction | R@1 | R@5 | R@10 | MdR | MnR |", "|---|---|---|---|---|---|---|",
        *_retrieval_rows("before", report["before"]["retrieval"]),
        *_retrieval_rows("after", report["after"]["retrieval"]), "",
        "## OoD detection (MCM, ID = digits 0–5, OoD = digits 6–9, positive = ID)", "",
        "| model | AUROC | AUPR-In | AUPR-Out | FPR@95 |", "|---|---|---|---|---|",
    ]
    for label in ("before", "after"):
        ood = report[label]["ood_mcm"]
        lines.append(f"| {label} | {ood['AUROC']:.3f} | {ood['AUPR_IN']:.3f} | {ood['AUPR_OUT']:.3f} | "
                     f"{ood['FPR95']:.3f} |")
    lines += ["", "## Meta-learned weights: mismatched vs clean pairs", ""]
    if weights is None:
        lines.append("Meta weighting was off or no mismatched pair was seen: no weights to compare.")
    else:
        verdict = "meets" if weights["auroc_clean_vs_mismatched"] >= 0.8 else "misses"
        lines += [
            f"AUROC of the learned weight (clean = positive): **{weights['auroc_clean_vs_mismatched']:.3f}** "
            f"({verdict} the 0.8 target) over {weights['clean_pairs']} clean and {weights['mismatched_pairs']} "
            f"mismatched pairs; mean weight {weights['mean_weight_clean']:.3f} (clean) vs "
            f"{weights['mean_weight_mismatched']:.3f} (mismatched).",
            "", "![weights](weights_mismatched_vs_clean.png)",
        ]
    lines += ["", "## Geometry (validation clips)", "", "| model | " + " | ".join(report["after"]["geometry"]) + " |",
              "|---|" + "---|" * len(report["after"]["geometry"])]
    for label in ("before", "after"):
        lines.append(f"| {label} | " + " | ".join(f"{value:.3f}" for value in report[label]["geometry"].values()) + " |")
    lines += ["", "![loss](loss_curve.png) ![weighting curve](run/weighting_curve.png)", ""]
    return "\n".join(lines)


def summary_text(report: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    before, after = report["before"], report["after"]
    lines = [f"t2v R@1: {before['retrieval']['t2v']['R@1']:.1f} -> {after['retrieval']['t2v']['R@1']:.1f}   "
             f"v2t R@1: {before['retrieval']['v2t']['R@1']:.1f} -> {after['retrieval']['v2t']['R@1']:.1f}",
             f"OoD (MCM) AUROC: {before['ood_mcm']['AUROC']:.3f} -> {after['ood_mcm']['AUROC']:.3f}"]
    if report["weights"] is not None:
        lines.append(f"meta weights separate mismatched from clean pairs: AUROC "
                     f"{report['weights']['auroc_clean_vs_mismatched']:.3f}")
    lines.append(f"total time {report['timing_s']['total']:.0f} s")
    return "\n".join(lines)
