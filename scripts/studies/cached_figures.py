"""Tables and plots of REPORT.md §5-§8 (the cached-feature studies) from their ``ablation.json`` files.

Prints every table as markdown (mean ± sample std over seeds, and for each comparison the paired
difference over the same seeds with the number of seeds where it is positive) and writes
``scripts/studies/figures/cached_{convergence,curves,noisy,duplicates,family,cma}.png`` and every run's
numbers into ``scripts/studies/figures/cached_results.json``; nothing is retrained.
A study that has not finished is reported as such.

    python scripts/studies/cached_figures.py --runs runs/study2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

REPORT_FIGURES = Path(__file__).resolve().parent / "figures"
FAMILY = ("clip", "angular_margin:margin=0.05", "angular_margin:margin=0.1", "angular_margin:margin=0.2", "siglip",
          "siglip:margin=0.1")
FAMILY_LABELS = {"clip": "CLIP (InfoNCE)", "angular_margin:margin=0.05": "angular margin 0.05",
                 "angular_margin:margin=0.1": "angular margin 0.1", "angular_margin:margin=0.2": "angular margin 0.2",
                 "siglip": "SigLIP", "siglip:margin=0.1": "SigLIP + margin 0.1"}
CMA_ARMS = (("margin", "0"), ("cma", "0.001"), ("cma@0.01", "0.01"), ("cma@0.1", "0.1"))
ACCURACY = "ood/id_accuracy"
OOD_SCORES = (("mcm", "MCM"), ("energy", "Energy"), ("neglabel", "NegLabel"))


def load(path: Path) -> dict[str, Any] | None:
    """An ``ablation.json``, or None when that study has not finished."""
    return json.loads(path.read_text()) if path.is_file() else None


def values(results: dict[str, Any], variant: str, key: str, scale: float = 1.0) -> dict[int, float]:
    """seed -> value of one metric of one variant."""
    return {run["seed"]: scale * run["metrics"][key] for run in results["runs"]
            if run["variant"] == variant and run["metrics"].get(key) is not None}


def mean_std(per_seed: dict[int, float], decimals: int) -> str:
    """``mean ± std (n−1)`` of the seeds' values."""
    if not per_seed:
        return "–"
    array = np.array(list(per_seed.values()))
    spread = f" ± {array.std(ddof=1):.{decimals}f}" if array.size > 1 else ""
    return f"{array.mean():.{decimals}f}{spread}"


def paired(a: dict[int, float], b: dict[int, float], decimals: int) -> str:
    """Paired difference b − a over the seeds both have: ``mean ± std (k/n > 0)``."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return "–"
    diff = np.array([b[seed] - a[seed] for seed in seeds])
    spread = f" ± {diff.std(ddof=1):.{decimals}f}" if diff.size > 1 else ""
    return f"{diff.mean():+.{decimals}f}{spread} ({int((diff > 0).sum())}/{diff.size} > 0)"


def steps_and_time(results: dict[str, Any], variant: str) -> str:
    """Training steps and the mean loop time of a variant's runs."""
    runs = [run for run in results["runs"] if run["variant"] == variant]
    if not runs:
        return "–"
    steps = sorted({run["training"].get("steps") for run in runs})
    seconds = np.mean([run["metrics"].get("time/train_s", np.nan) for run in runs])
    return f"{'/'.join(str(step) for step in steps)} steps, {seconds:.0f} s"


def curve(run_dir: str, key: str = "val/t2v/R@1") -> tuple[list[int], list[float]]:
    """The validation curve of one run from its ``metrics.jsonl``."""
    steps, found = [], []
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return steps, found
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if key in record:
            steps.append(record["step"])
            found.append(record[key])
    return steps, found


def dots(axis, groups: list[tuple[str, dict[int, float]]], ylabel: str) -> None:
    """Each seed as a dot per arm, with the mean as a bar."""
    for index, (_, per_seed) in enumerate(groups):
        points = list(per_seed.values())
        if points:
            axis.scatter(np.full(len(points), index) + np.linspace(-0.12, 0.12, len(points)), points, s=14)
            axis.hlines(np.mean(points), index - 0.3, index + 0.3, color="black")
    axis.set_xticks(range(len(groups)), [label for label, _ in groups], rotation=35, ha="right", fontsize=7)
    axis.set_ylabel(ylabel)


def noisy(runs: Path, out: Path) -> str:
    studies = {level: load(runs / f"noisy_{level}" / "ablation.json") for level in ("00", "20", "40")}
    if any(results is None for results in studies.values()):
        return "§5 noisy captions: not finished\n"
    # retrieval among class prompts is mostly ties (40 images per class share the same five captions), and
    # the tie rule counts them against the query: image→text R@1 is 0 for every run, so only t2v is shown
    lines = ["| corrupted | meta weighting | class accuracy % | t2v R@1 | weight AUROC (clean vs corrupted) "
             "| mean weight clean / corrupted | steps, loop time |", "|---|---|---|---|---|---|---|"]
    diffs = ["| corrupted | meta off trained for (steps) | Δ accuracy (meta on, 400 steps − off) | Δ t2v R@1 |",
             "|---|---|---|---|"]
    figure = Figure(figsize=(9, 3.2))
    axes = figure.subplots(1, 3)
    for axis, (level, results) in zip(axes, studies.items()):
        for variant in ("margin", "meta"):
            auroc = weights = "–"
            if variant == "meta" and values(results, variant, "weights/auroc_clean_vs_mismatched"):
                auroc = mean_std(values(results, variant, "weights/auroc_clean_vs_mismatched"), 3)
                weights = (f"{mean_std(values(results, variant, 'weights/mean_weight_clean'), 3)} / "
                           f"{mean_std(values(results, variant, 'weights/mean_weight_mismatched'), 3)}")
            lines.append(f"| {int(level)}% | {'on' if variant == 'meta' else 'off'} | "
                         f"{mean_std(values(results, variant, ACCURACY, 100), 1)} | "
                         f"{mean_std(values(results, variant, 't2v/R@1'), 1)} | {auroc} | {weights} | "
                         f"{steps_and_time(results, variant)} |")
        diffs.append(f"| {int(level)}% | 400 | {paired(values(results, 'margin', ACCURACY, 100), values(results, 'meta', ACCURACY, 100), 1)} | "
                     f"{paired(values(results, 'margin', 't2v/R@1'), values(results, 'meta', 't2v/R@1'), 1)} |")
        for steps in (100, 200):
            early = load(runs / f"noisy_{level}_early" / f"steps_{steps}" / "ablation.json")
            if early is None:
                continue
            lines.append(f"| {int(level)}% | off, stopped early | {mean_std(values(early, 'margin', ACCURACY, 100), 1)} | "
                         f"{mean_std(values(early, 'margin', 't2v/R@1'), 1)} | – | – | {steps_and_time(early, 'margin')} |")
            diffs.append(f"| {int(level)}% | {steps} | {paired(values(early, 'margin', ACCURACY, 100), values(results, 'meta', ACCURACY, 100), 1)} | "
                         f"{paired(values(early, 'margin', 't2v/R@1'), values(results, 'meta', 't2v/R@1'), 1)} |")
        dots(axis, [("meta off", values(results, "margin", ACCURACY, 100)),
                    ("meta on", values(results, "meta", ACCURACY, 100))], "class accuracy (%)")
        axis.set_title(f"{int(level)}% corrupted captions", fontsize=9)
    figure.tight_layout()
    figure.savefig(out / "cached_noisy.png", dpi=120)
    return "\n".join(lines + [""] + diffs) + "\n"


def ood_row(results: dict[str, Any], variant: str) -> str:
    cells = [mean_std(values(results, variant, ACCURACY, 100), 1)]
    for score, _ in OOD_SCORES:
        cells.append(mean_std(values(results, variant, f"ood/{score}/cifar_ood/AUROC"), 3))
        cells.append(mean_std(values(results, variant, f"ood/{score}/cifar_ood/FPR95", 100), 1))
    cells.append(mean_std(values(results, variant, "t2v/R@1"), 1))
    return " | ".join(cells)


OOD_HEADER = ("ID accuracy % | MCM AUROC | MCM FPR@95 % | Energy AUROC | Energy FPR@95 % | NegLabel AUROC | "
              "NegLabel FPR@95 % | t2v R@1")


def duplicates(runs: Path, out: Path) -> str:
    arms = {(batch, positives): load(runs / "duplicates" / f"b{batch}_{positives}" / "ablation.json")
            for batch in (64, 256) for positives in ("diagonal", "group")}
    if any(results is None for results in arms.values()):
        return "§6 duplicates: not finished\n"
    lines = [f"| batch | positives | CMA | {OOD_HEADER} | steps, loop time |", "|---|---|---|" + "---|" * 9]
    diffs = ["| batch | CMA | Δ ID accuracy (group − diagonal) | Δ MCM AUROC | Δ Energy AUROC | Δ NegLabel AUROC |",
             "|---|---|---|---|---|---|"]
    groups = []
    for (batch, positives), results in arms.items():
        for variant in ("margin", "cma"):
            lines.append(f"| {batch} | {positives} | {'λ=0.001' if variant == 'cma' else '–'} | {ood_row(results, variant)} | "
                         f"{steps_and_time(results, variant)} |")
            groups.append((f"b{batch} {positives}{' +CMA' if variant == 'cma' else ''}",
                           values(results, variant, "ood/mcm/cifar_ood/AUROC")))
    for batch in (64, 256):
        for variant in ("margin", "cma"):
            diagonal, group = arms[(batch, "diagonal")], arms[(batch, "group")]
            cells = [paired(values(diagonal, variant, ACCURACY, 100), values(group, variant, ACCURACY, 100), 1)]
            cells += [paired(values(diagonal, variant, f"ood/{score}/cifar_ood/AUROC"),
                             values(group, variant, f"ood/{score}/cifar_ood/AUROC"), 3) for score, _ in OOD_SCORES]
            diffs.append(f"| {batch} | {'λ=0.001' if variant == 'cma' else '–'} | " + " | ".join(cells) + " |")
    figure = Figure(figsize=(6, 3.4))
    dots(figure.subplots(), groups, "MCM AUROC (ID = positive)")
    figure.tight_layout()
    figure.savefig(out / "cached_duplicates.png", dpi=120)
    return "\n".join(lines + [""] + diffs) + "\n"


def family(runs: Path, out: Path) -> str:
    text = []
    figure = Figure(figsize=(10, 3.6))
    axes = figure.subplots(1, 2)
    for axis, (task, key, label, scale) in zip(axes, (("cifar", ACCURACY, "ID accuracy %", 100),
                                                     ("coco", "t2v/R@1", "t2v R@1", 1))):
        arms = {positives: load(runs / f"family_{task}" / positives / "ablation.json") for positives in ("diagonal", "group")}
        if any(results is None for results in arms.values()):
            text.append(f"§7 loss family on {task}: not finished\n")
            continue
        if task == "cifar":
            lines = [f"| loss | positives | {OOD_HEADER} |", "|---|---|" + "---|" * 8]
        else:
            lines = ["| loss | positives | t2v R@1 | t2v R@5 | v2t R@1 | v2t R@5 |", "|---|---|---|---|---|---|"]
        groups = []
        for variant in FAMILY:
            for positives, results in arms.items():
                if task == "cifar":
                    row = ood_row(results, variant)
                else:
                    row = " | ".join(mean_std(values(results, variant, metric), 1)
                                     for metric in ("t2v/R@1", "t2v/R@5", "v2t/R@1", "v2t/R@5"))
                lines.append(f"| {FAMILY_LABELS[variant]} | {positives} | {row} |")
                groups.append((f"{FAMILY_LABELS[variant]} {positives[0]}", values(results, variant, key, scale)))
        baseline = values(arms["diagonal"], "clip", key, scale)
        lines += ["", f"| loss | Δ {label} vs CLIP diagonal (diagonal) | Δ (group) |", "|---|---|---|"]
        for variant in FAMILY:
            lines.append(f"| {FAMILY_LABELS[variant]} | {paired(baseline, values(arms['diagonal'], variant, key, scale), 1)} | "
                         f"{paired(baseline, values(arms['group'], variant, key, scale), 1)} |")
        text.append(f"**{task}**\n\n" + "\n".join(lines) + "\n")
        dots(axis, groups, label)
        axis.set_title(task, fontsize=9)
    figure.tight_layout()
    figure.savefig(out / "cached_family.png", dpi=120)
    return "\n".join(text)


def cma(runs: Path, out: Path) -> str:
    results = load(runs / "cma_weight" / "ablation.json")
    if results is None:
        return "§8 CMA weight: not finished\n"
    lines = [f"| λ | {OOD_HEADER} |", "|---|" + "---|" * 8]
    diffs = ["| λ | Δ MCM AUROC vs λ=0 | Δ Energy AUROC | Δ NegLabel AUROC | Δ ID accuracy |", "|---|---|---|---|---|"]
    for variant, weight in CMA_ARMS:
        lines.append(f"| {weight} | {ood_row(results, variant)} |")
        if variant != "margin":
            cells = [paired(values(results, "margin", f"ood/{score}/cifar_ood/AUROC"),
                            values(results, variant, f"ood/{score}/cifar_ood/AUROC"), 3) for score, _ in OOD_SCORES]
            cells.append(paired(values(results, "margin", ACCURACY, 100), values(results, variant, ACCURACY, 100), 1))
            diffs.append(f"| {weight} | " + " | ".join(cells) + " |")
    figure = Figure(figsize=(8, 3.2))
    axes = figure.subplots(1, 3)
    for axis, (score, name) in zip(axes, OOD_SCORES):
        dots(axis, [(f"λ={weight}", values(results, variant, f"ood/{score}/cifar_ood/AUROC")) for variant, weight in CMA_ARMS],
             f"{name} AUROC")
    figure.tight_layout()
    figure.savefig(out / "cached_cma.png", dpi=120)
    return "\n".join(lines + [""] + diffs) + "\n"


def curves(runs: Path, out: Path) -> str:
    """Validation curves (``val_every`` steps) of the baseline arm of every study, each seed a line.

    CIFAR: text→image R@10 (with class prompts a caption matches all 40 validation images of its class,
    so R@1 is mostly ties and R@10 measures how well texts find their class; its ceiling is 25%).
    COCO: text→image R@1.
    """
    panels = [("noisy 0% (meta off)", runs / "noisy_00", "margin", "val/t2v/R@10"),
              ("noisy 40% (meta off)", runs / "noisy_40", "margin", "val/t2v/R@10"),
              ("noisy 40% (meta on)", runs / "noisy_40", "meta", "val/t2v/R@10"),
              ("CIFAR prompts b64", runs / "duplicates" / "b64_diagonal", "margin", "val/t2v/R@10"),
              ("CIFAR prompts b256", runs / "duplicates" / "b256_diagonal", "margin", "val/t2v/R@10"),
              ("COCO CLIP", runs / "family_coco" / "diagonal", "clip", "val/t2v/R@1"),
              ("COCO SigLIP", runs / "family_coco" / "diagonal", "siglip", "val/t2v/R@1")]
    figure = Figure(figsize=(14, 3.2))
    axes = figure.subplots(1, len(panels))
    notes = ["| run | metric | best step (mean over seeds) | last step | last − best (mean) |", "|---|---|---|---|---|"]
    for axis, (title, study, variant, key) in zip(axes, panels):
        results = load(study / "ablation.json")
        axis.set_title(title, fontsize=8)
        axis.set_xlabel("step", fontsize=8)
        axis.set_ylabel(key.removeprefix("val/"), fontsize=8)
        if results is None:
            continue
        best_steps, gaps, last = [], [], None
        for run in results["runs"]:
            if run["variant"] == variant:
                steps, found = curve(run["run_dir"], key)
                axis.plot(steps, found, linewidth=0.8)
                if found:
                    best_steps.append(steps[int(np.argmax(found))])
                    gaps.append(found[-1] - max(found))
                    last = steps[-1]
        if gaps:
            notes.append(f"| {title} | {key} | {np.mean(best_steps):.0f} | {last} | {np.mean(gaps):+.2f} |")
    figure.tight_layout()
    figure.savefig(out / "cached_curves.png", dpi=120)
    return "\n".join(notes) + "\n"


def convergence(runs: Path, out: Path) -> str:
    """Class accuracy of the baseline (margin) trained for 50 ... 800 steps, per task, with a plot."""
    steps = (50, 100, 200, 400, 800)
    lines = ["| task | " + " | ".join(f"{step} steps" for step in steps) + " |", "|---|" + "---|" * len(steps)]
    figure = Figure(figsize=(4.5, 3.2))
    axis = figure.subplots()
    for task, label in (("all10", "10 classes, 5000 pairs"), ("id5", "5 ID classes, 2500 pairs")):
        found = {step: load(runs / "convergence" / f"{task}_{step}" / "ablation.json") for step in steps}
        per_step = {step: values(results, "margin", ACCURACY, 100) for step, results in found.items() if results}
        lines.append(f"| {label} | " + " | ".join(mean_std(per_step.get(step, {}), 1) for step in steps) + " |")
        if per_step:
            axis.errorbar(list(per_step), [np.mean(list(v.values())) for v in per_step.values()],
                          [np.std(list(v.values()), ddof=1) for v in per_step.values()], marker="o", label=label)
    axis.set_xscale("log")
    axis.set_xlabel("training steps (batch 64)")
    axis.set_ylabel("class accuracy % (5 seeds)")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out / "cached_convergence.png", dpi=120)
    return "\n".join(lines) + "\n"


def per_seed_json(runs: Path, out: Path) -> str:
    """Every run's numbers of every study, one JSON file kept with the figures (the runs folder is not in git)."""
    studies = {}
    for path in sorted(runs.rglob("ablation.json")):
        results = json.loads(path.read_text())
        studies[str(path.parent.relative_to(runs))] = {
            "command": results["description"].get("command"), "overrides": results["description"].get("overrides"),
            "variants": results["variants"], "seeds": results["seeds"],
            "invocation_wall_time_s": results["invocation_wall_time_s"],
            "runs": [{"variant": run["variant"], "seed": run["seed"], "steps": run["training"].get("steps"),
                      "metrics": run["metrics"]} for run in results["runs"]]}
    target = out / "cached_results.json"
    target.write_text(json.dumps({"machine": results["machine"], "versions": results["versions"], "studies": studies},
                                 indent=1) + "\n")
    return f"{len(studies)} studies, {sum(len(study['runs']) for study in studies.values())} runs -> {target}\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("runs/study2"))
    parser.add_argument("--out", type=Path, default=REPORT_FIGURES)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for title, section in (("convergence (class accuracy vs steps)", convergence), ("§5 noisy captions", noisy), ("§6 duplicates as negatives vs multi-positive", duplicates),
                           ("§7 loss family", family), ("§8 CMA weight", cma), ("convergence", curves),
                           ("per-seed numbers", per_seed_json)):
        print(f"## {title}\n\n{section(args.runs, args.out)}")


if __name__ == "__main__":
    main()
