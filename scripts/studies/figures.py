"""Tables and plots of REPORT.md from the studies' ``ablation.json`` files (nothing is retrained).

Writes ``scripts/studies/figures/{noisy_pairs,coco,cifar_ood,cma_sweep,temporal}.png`` (the one folder of REPORT.md's figures
that REPORT.md's images point to) and prints every table as markdown; a study whose results are missing is
skipped with a note.

    python scripts/studies/figures.py --runs runs/study --out scripts/studies/figures
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from mmsphere.ablation import format_mean_std, plot_ablation

# one folder for every figure of REPORT.md; not beside it: the repository's top-level layout is fixed
REPORT_FIGURES = Path(__file__).resolve().parent / "figures"
NOISE_LEVELS = ("00", "20", "40")
R1 = (("t2v/R@1", "text→video R@1"), ("v2t/R@1", "video→text R@1"))


def load(path: Path) -> dict[str, Any] | None:
    """An ``ablation.json``, or None when that study has not finished."""
    return json.loads(path.read_text()) if path.is_file() else None


def seed_values(results: dict[str, Any], variant: str, key: str) -> list[float]:
    """Every seed's value of one metric, in seed order."""
    return [run["metrics"][key] for run in results["runs"] if run["variant"] == variant and key in run["metrics"]]


def cell(results: dict[str, Any], variant: str, key: str, decimals: int = 1) -> str:
    return format_mean_std(results["aggregate"].get(variant, {}).get(key), decimals)


def train_seconds(results: dict[str, Any], variant: str) -> str:
    return cell(results, variant, "time/train_s", 0)


def noisy_pairs(runs: Path, out: Path) -> str:
    studies = {level: load(runs / f"noisy_{level}" / "ablation" / "ablation.json") for level in NOISE_LEVELS}
    if any(results is None for results in studies.values()):
        return "noisy pairs: not finished"
    lines = ["| mismatched | meta weighting | t2v R@1 | v2t R@1 | t2v R@5 | AUROC of weight (clean vs mismatched) "
             "| mean weight clean / mismatched | train loop (s) |", "|---|---|---|---|---|---|---|---|"]
    for level, results in studies.items():
        for variant in ("margin", "meta"):
            weights = "–"
            if variant == "meta" and "weights/mean_weight_clean" in results["aggregate"]["meta"]:
                weights = (f"{cell(results, 'meta', 'weights/mean_weight_clean', 3)} / "
                           f"{cell(results, 'meta', 'weights/mean_weight_mismatched', 3)}")
            lines.append(f"| {int(level)}% | {'on' if variant == 'meta' else 'off'} | {cell(results, variant, 't2v/R@1')} "
                         f"| {cell(results, variant, 'v2t/R@1')} | {cell(results, variant, 't2v/R@5')} | "
                         f"{cell(results, variant, 'weights/auroc_clean_vs_mismatched', 3) if variant == 'meta' else '–'} "
                         f"| {weights} | {train_seconds(results, variant)} |")
    figure = Figure(figsize=(11, 3.6), layout="constrained")
    axes = figure.subplots(1, 3)
    levels = [int(level) for level in NOISE_LEVELS]
    for panel, (key, label) in zip(axes[:2], R1):
        for offset, (variant, name) in enumerate((("margin", "meta off"), ("meta", "meta on"))):
            x = np.array(levels) + (offset - 0.5) * 1.5
            per_level = [seed_values(studies[level], variant, key) for level in NOISE_LEVELS]
            line = panel.errorbar(x, [np.mean(values) for values in per_level],
                                  yerr=[np.std(values, ddof=1) for values in per_level], capsize=3, label=name)
            for position, values in zip(x, per_level):
                panel.plot([position] * len(values), values, "o", color=line[0].get_color(), markersize=3)
        panel.set(xlabel="mismatched captions (%)", ylabel=f"{label} (%)", title=label, xticks=levels)
        panel.legend(fontsize="small")
    values = [seed_values(studies[level], "meta", "weights/auroc_clean_vs_mismatched") for level in NOISE_LEVELS[1:]]
    line = axes[2].errorbar(levels[1:], [np.mean(v) for v in values], yerr=[np.std(v, ddof=1) for v in values],
                            capsize=3, color="C1", label="meta on")
    for level, seeds in zip(levels[1:], values):
        axes[2].plot([level] * len(seeds), seeds, "o", color=line[0].get_color(), markersize=3)
    axes[2].axhline(0.5, color="grey", linestyle=":", label="chance")
    axes[2].set(xlabel="mismatched captions (%)", ylabel="AUROC", title="learned weight: clean vs mismatched",
                xticks=levels[1:], ylim=(0, 1))
    axes[2].legend(fontsize="small")
    figure.savefig(out / "noisy_pairs.png", dpi=120)
    return "\n".join(lines)


def coco(runs: Path, out: Path) -> str:
    results = load(runs / "coco" / "ablation.json")
    if results is None:
        return "coco: not finished"
    lines = ["| variant | t2i R@1 | t2i R@5 | t2i R@10 | i2t R@1 | i2t R@5 | i2t R@10 | modality gap | train loop (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for variant in results["variants"]:
        lines.append(f"| {variant} | " + " | ".join(cell(results, variant, key) for key in (
            "t2v/R@1", "t2v/R@5", "t2v/R@10", "v2t/R@1", "v2t/R@5", "v2t/R@10")) +
            f" | {cell(results, variant, 'geometry/modality_gap', 3)} | {train_seconds(results, variant)} |")
    plot_ablation(results, out / "coco.png")
    return "\n".join(lines)


def run_file_values(results: dict[str, Any], variant: str, file: str, key: str) -> list[float]:
    """Every seed's ``key`` from a JSON file a study script wrote into the run folders (missing files skipped)."""
    values = []
    for run in results["runs"]:
        path = Path(run["run_dir"]) / file
        if run["variant"] == variant and path.is_file():
            values.append(float(json.loads(path.read_text())[key]))
    return values


def cifar_ood(runs: Path, out: Path) -> str:
    schedules = {"40 steps": load(runs / "cifar" / "ablation" / "ablation.json"),
                 "120 steps": load(runs / "cifar" / "ablation_120" / "ablation.json")}
    schedules = {name: results for name, results in schedules.items() if results is not None}
    if not schedules:
        return "cifar ood: not finished"
    lines = ["| schedule | variant | MCM AUROC | MCM FPR@95 | energy AUROC | energy FPR@95 | ID accuracy (5 classes) "
             "| train loop (s) |", "|---" * 8 + "|"]
    for schedule, results in schedules.items():
        for variant in results["variants"]:
            lines.append(f"| {schedule if variant != 'zero-shot' else '–'} | {variant} | "
                         f"{cell(results, variant, 'ood/mcm/mean/AUROC', 3)} | {cell(results, variant, 'ood/mcm/mean/FPR95', 3)} | "
                         f"{cell(results, variant, 'ood/energy/mean/AUROC', 3)} | "
                         f"{cell(results, variant, 'ood/energy/mean/FPR95', 3)} | "
                         f"{mean_std(run_file_values(results, variant, 'id_accuracy.json', 'id_accuracy'), 1)} | "
                         f"{train_seconds(results, variant)} |")
    scores = (("ood/mcm/mean/AUROC", "MCM"), ("ood/energy/mean/AUROC", "energy"))
    figure = Figure(figsize=(10, 3.6), layout="constrained")
    for axes, (schedule, results) in zip(np.atleast_1d(figure.subplots(1, len(schedules))), schedules.items()):
        variants = list(results["variants"])
        width = 0.38
        for offset, (key, name) in enumerate(scores):
            positions = np.arange(len(variants)) + (offset - 0.5) * width
            seeds = [seed_values(results, variant, key) for variant in variants]
            bars = axes.bar(positions, [np.mean(v) for v in seeds],
                            width, yerr=[np.std(v, ddof=1) if len(v) > 1 else 0 for v in seeds], capsize=3,
                            alpha=0.6, label=name)
            for position, values in zip(positions, seeds):
                axes.plot([position] * len(values), values, "o", color=bars.patches[0].get_facecolor(),
                          markersize=3, alpha=1.0)
        axes.axhline(0.5, color="grey", linestyle=":", label="chance")
        axes.set_xticks(np.arange(len(variants)), variants)
        axes.set(ylabel="AUROC (ID positive)", ylim=(0.4, 1.0), title=f"CIFAR-10 5/5 split, {schedule}")
        axes.legend(fontsize="small")
    figure.savefig(out / "cifar_ood.png", dpi=120)
    return "\n".join(lines)


def final_logged(results: dict[str, Any], variant: str, key: str) -> list[float]:
    """Every seed's last logged training value of ``key`` (``metrics.jsonl``), in seed order; [] if never logged."""
    values = []
    for run in results["runs"]:
        path = Path(run["run_dir"]) / "metrics.jsonl"
        if run["variant"] == variant and path.is_file():
            logged = [row[key] for row in map(json.loads, path.read_text().splitlines()) if key in row]
            if logged:  # a run without that term never logs it
                values.append(float(logged[-1]))
    return values


def cma_weight(variant: str) -> float:
    """λ of a ``margin`` / ``cma`` / ``cma@λ`` variant (0 without CMA, 0.001 the documented default)."""
    return 0.0 if variant == "margin" else float(variant.partition("@")[2] or 0.001)


def cma_table(results: dict[str, Any], last_step: int) -> tuple[list[str], list[str]]:
    """The CMA variants of a study in order of λ, and their markdown table."""
    variants = sorted((variant for variant in results["variants"] if variant != "zero-shot"), key=cma_weight)
    lines = ["| λ (CMA weight) | MCM AUROC | MCM FPR@95 | energy AUROC | energy FPR@95 | ID accuracy (5 classes) "
             f"| λ·CMA at step {last_step} | angular-margin loss at step {last_step} | energy AUROC per seed "
             "| train loop (s) |", "|---" * 10 + "|"]
    for variant in variants:
        weighted = [cma_weight(variant) * value for value in final_logged(results, variant, "loss/cma")]
        energy = ", ".join(f"{value:.3f}" for value in seed_values(results, variant, "ood/energy/mean/AUROC"))
        lines.append(f"| {cma_weight(variant):g} | "
                     + " | ".join(cell(results, variant, key, 3) for key in (
                         "ood/mcm/mean/AUROC", "ood/mcm/mean/FPR95", "ood/energy/mean/AUROC", "ood/energy/mean/FPR95"))
                     + f" | {mean_std(run_file_values(results, variant, 'id_accuracy.json', 'id_accuracy'), 1)}"
                     + f" | {mean_std(weighted, 3) if weighted else '0'}"
                     + f" | {mean_std(final_logged(results, variant, 'loss/angular_margin'), 3)}"
                     + f" | {energy} | {train_seconds(results, variant)} |")
    return variants, lines


def cma_sweep(runs: Path, out: Path) -> str:
    results = load(runs / "cifar" / "cma_sweep" / "ablation.json")
    if results is None:
        return "cma sweep: not finished"
    variants, lines = cma_table(results, last_step=40)
    confirmation = load(runs / "cifar" / "cma_120" / "ablation.json")
    if confirmation is not None:
        lines += ["", "At 120 steps (the λ chosen above, on the 500 + 500 test images of the 120-step arm):", ""]
        lines += cma_table(confirmation, last_step=120)[1]
    figure = Figure(figsize=(10, 3.6), layout="constrained")
    positions = np.arange(len(variants))
    labels = [f"{cma_weight(variant):g}" for variant in variants]
    auroc_axes, accuracy_axes = figure.subplots(1, 2)
    for key, name, marker in (("ood/mcm/mean/AUROC", "MCM", "o"), ("ood/energy/mean/AUROC", "energy", "s")):
        seeds = [seed_values(results, variant, key) for variant in variants]
        line, = auroc_axes.plot(positions, [np.mean(values) for values in seeds], marker=marker, label=name)
        for position, values in zip(positions, seeds):
            auroc_axes.plot([position] * len(values), values, marker, color=line.get_color(), markersize=3, alpha=0.5)
    auroc_axes.axhline(0.5, color="grey", linestyle=":", label="chance")
    auroc_axes.set(xlabel="λ (CMA weight)", ylabel="AUROC (ID positive)", ylim=(0.3, 1.0),
                   title="CIFAR-10 5/5 split, 40 steps: AUROC vs λ")
    accuracy = [run_file_values(results, variant, "id_accuracy.json", "id_accuracy") for variant in variants]
    line, = accuracy_axes.plot(positions, [np.mean(values) if values else np.nan for values in accuracy], marker="o")
    for position, values in zip(positions, accuracy):
        accuracy_axes.plot([position] * len(values), values, "o", color=line.get_color(), markersize=3, alpha=0.5)
    accuracy_axes.axhline(20, color="grey", linestyle=":", label="chance")
    accuracy_axes.set(xlabel="λ (CMA weight)", ylabel="ID accuracy (%)", ylim=(0, 100), title="5-class ID accuracy vs λ")
    for axes in (auroc_axes, accuracy_axes):
        axes.set_xticks(positions, labels)
        axes.legend(fontsize="small")
    figure.savefig(out / "cma_sweep.png", dpi=120)
    return "\n".join(lines)


def order_results(results: dict[str, Any], variant: str) -> dict[str, list[float]]:
    """Per metric of ``temporal_order.py``, every seed's value (runs without the file are left out)."""
    values: dict[str, list[float]] = {}
    for run in results["runs"]:
        path = Path(run["run_dir"]) / "order_accuracy.json"
        if run["variant"] == variant and path.is_file():
            for key, value in json.loads(path.read_text()).items():
                values.setdefault(key, []).append(float(value))
    return values


def mean_std(values: list[float], decimals: int) -> str:
    if not values:
        return "–"
    return f"{np.mean(values):.{decimals}f} ± {np.std(values, ddof=1):.{decimals}f}" if len(values) > 1 else \
        f"{values[0]:.{decimals}f} (n=1)"


def temporal(runs: Path, out: Path) -> str:
    arms = {"transformer": load(runs / "noisy_00" / "ablation" / "ablation.json"),
            "mean": load(runs / "temporal_mean" / "ablation.json")}
    if any(results is None for results in arms.values()):
        return "temporal: not finished"
    lines = ["| temporal head | t2v R@1 | t2v R@5 | v2t R@1 | v2t R@5 | order acc. v2t | order acc. t2v "
             "| partner cosine, text | partner cosine, video | train loop (s) |", "|---" * 10 + "|"]
    order = {head: order_results(results, "margin") for head, results in arms.items()}
    for head, results in arms.items():
        lines.append(f"| {head} | " + " | ".join(cell(results, "margin", key) for key in (
            "t2v/R@1", "t2v/R@5", "v2t/R@1", "v2t/R@5")) + " | " + " | ".join(
            mean_std(order[head].get(key, []), decimals) for key, decimals in (
                ("v2t", 1), ("t2v", 1), ("partner_text_cosine", 4), ("partner_video_cosine", 4))) +
            f" | {train_seconds(results, 'margin')} |")
    panels = [(R1, "R@1 (%)", "retrieval R@1"), ((("v2t", "video→text"), ("t2v", "text→video")),
                                                  "order accuracy (%)", "order within reversed pairs")]
    figure = Figure(figsize=(10, 3.6), layout="constrained")
    width = 0.38
    for axes, (series, ylabel, title) in zip(figure.subplots(1, 2), panels):
        for offset, (head, results) in enumerate(arms.items()):
            positions = np.arange(len(series)) + (offset - 0.5) * width
            seeds = [seed_values(results, "margin", key) if "/" in key else order[head].get(key, [])
                     for key, _ in series]
            bars = axes.bar(positions, [np.mean(v) for v in seeds], width, yerr=[np.std(v, ddof=1) for v in seeds],
                            capsize=3, alpha=0.6, label=f"{head} head")
            for position, values in zip(positions, seeds):
                axes.plot([position] * len(values), values, "o", color=bars.patches[0].get_facecolor(),
                          markersize=3, alpha=1.0)
        axes.set_xticks(np.arange(len(series)), [label for _, label in series])
        axes.set(ylabel=ylabel, title=f"{title}: mean ± std, dots = seeds")
        if ylabel.startswith("order"):
            axes.axhline(50, color="grey", linestyle=":", label="chance")
        axes.legend(fontsize="small")
    figure.savefig(out / "temporal.png", dpi=120)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs/study", help="the studies' output folder")
    parser.add_argument("--out", default=str(REPORT_FIGURES), help="where the PNGs go (default: %(default)s)")
    args = parser.parse_args()
    runs, out = Path(args.runs), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for title, study in (("noisy pairs", noisy_pairs), ("COCO", coco), ("CIFAR-10 OoD", cifar_ood),
                         ("CMA weight sweep", cma_sweep), ("temporal head", temporal)):
        print(f"## {title}\n\n{study(runs, out)}\n")


if __name__ == "__main__":
    main()
