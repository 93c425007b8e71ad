"""Paired 95% intervals of the REPORT.md §5-§8 comparisons, from the stored per-seed numbers.

Reads ``scripts/studies/figures/cached_results.json`` (written by ``cached_figures.py``) and prints, for
every comparison the report makes, the paired difference (arm − baseline) over the seeds both arms have:
mean ± sample std (n − 1) and the 95% interval mean ± t_{0.975, n−1}·std/√n (Student t; 2.776 for 5
seeds), with one digit more than the report's tables, and how many seeds are above and below 0 (equal
values count as neither). ``--summary`` prints only the rows behind REPORT.md's summary table. A
comparison whose runs are not stored is printed as such. Nothing is retrained; standard library only.

    python3 scripts/studies/intervals.py [--summary] [--results scripts/studies/figures/cached_results.json]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "figures" / "cached_results.json"
# two-sided 95% quantiles of Student's t, t_{0.975, dof}
T_975 = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 5: 2.5706, 6: 2.4469, 7: 2.3646, 8: 2.3060, 9: 2.2622}
# a difference this small is float noise between equal values (a tie), counted neither > 0 nor < 0
TIE = 1e-9
ACC = ("ID accuracy", "ood/id_accuracy", 100.0, 1)  # (name, metric key, scale, decimals)
T2V = ("t2v R@1", "t2v/R@1", 1.0, 1)
MCM, ENERGY, NEGLABEL = ((f"{name} AUROC", f"ood/{score}/cifar_ood/AUROC", 1.0, 3)
                         for score, name in (("mcm", "MCM"), ("energy", "Energy"), ("neglabel", "NegLabel")))
FPR = tuple((f"{name} FPR@95 %", f"ood/{score}/cifar_ood/FPR95", 100.0, 1)
            for score, name in (("mcm", "MCM"), ("energy", "Energy"), ("neglabel", "NegLabel")))
SCORES = (ACC, MCM, ENERGY, NEGLABEL)
LOSSES = {"clip": "CLIP", "angular_margin:margin=0.05": "margin 0.05", "angular_margin:margin=0.1": "margin 0.1",
          "angular_margin:margin=0.2": "margin 0.2", "siglip": "SigLIP", "siglip:margin=0.1": "SigLIP + margin 0.1"}
MARGINS = ("angular_margin:margin=0.05", "angular_margin:margin=0.1", "angular_margin:margin=0.2")


def comparisons() -> list[tuple[str, str, tuple[str, str], tuple[str, str], tuple, bool]]:
    """(section, label, (baseline study, variant), (arm study, variant), metric, in the summary) for every Δ."""
    rows = []
    for level in ("00", "20", "40"):  # §5: meta on − off at the same 400 steps, and − the early-stopped baseline
        rows.append(("§5", f"meta − off, {int(level)}% corrupted", ("noisy_" + level, "margin"),
                     ("noisy_" + level, "meta"), ACC, True))
    for level in ("20", "40"):  # no early-stopped baseline was run at 0%
        for steps in (100, 200):
            rows.append(("§5", f"meta − off stopped at {steps} steps, {int(level)}%",
                         (f"noisy_{level}_early/steps_{steps}", "margin"), ("noisy_" + level, "meta"), ACC, True))
    for batch in (64, 256):  # §6: group − diagonal (margin 0.1), without and with CMA at λ = 0.001
        for cma, variant in (("", "margin"), (", both with CMA 0.001", "cma")):
            for metric in SCORES:
                rows.append(("§6", f"group − diagonal, batch {batch}{cma}", (f"duplicates/b{batch}_diagonal", variant),
                             (f"duplicates/b{batch}_group", variant), metric, not cma))
    for batch in (64, 256):  # §6: CMA (λ = 0.001) − none, within each target
        for positives in ("diagonal", "group"):
            for metric in SCORES:
                rows.append(("§6", f"CMA 0.001 − none, batch {batch}, {positives}",
                             (f"duplicates/b{batch}_{positives}", "margin"), (f"duplicates/b{batch}_{positives}", "cma"),
                             metric, positives == "group"))
    for task, metrics in (("CIFAR", SCORES), ("COCO", (T2V,))):  # §7: every loss − CLIP diagonal
        study = f"family_{task.lower()}"
        for variant, loss in LOSSES.items():
            for positives in ("diagonal", "group"):
                if variant == "clip" and positives == "diagonal":
                    continue
                for metric in metrics:
                    summary = ((variant in MARGINS and metric in (ACC, T2V)) or (variant == "clip" and task == "COCO") or
                               (positives == "diagonal" and variant.startswith("siglip") and metric in (ACC, MCM, T2V)))
                    rows.append(("§7", f"{task}: {loss} {positives} − CLIP diagonal", (f"{study}/diagonal", "clip"),
                                 (f"{study}/{positives}", variant), metric, summary))
        for variant, loss in LOSSES.items():  # §7: group − diagonal form of the same loss
            if variant == "clip":
                continue
            for metric in metrics:
                rows.append(("§7", f"{task}: {loss} group − diagonal", (f"{study}/diagonal", variant),
                             (f"{study}/group", variant), metric, task == "COCO" and variant != "siglip:margin=0.1"))
    for variant, weight in (("cma", "0.001"), ("cma@0.01", "0.01"), ("cma@0.1", "0.1")):  # §8: λ − 0
        for metric in SCORES + FPR:
            rows.append(("§8", f"CMA λ = {weight} − λ = 0", ("cma_weight", "margin"), ("cma_weight", variant), metric,
                         weight != "0.01" and metric in SCORES))
    return rows


def per_seed(studies: dict, study: str, variant: str, key: str, scale: float) -> dict[int, float]:
    """seed -> value ({} when the study or the metric is not stored)."""
    return {run["seed"]: scale * run["metrics"][key] for run in studies.get(study, {}).get("runs", [])
            if run["variant"] == variant and run["metrics"].get(key) is not None}


def interval(diffs: list[float]) -> tuple[float, float, float, float]:
    """mean, sample std, and the 95% Student-t interval of paired differences."""
    mean, std = statistics.fmean(diffs), statistics.stdev(diffs)
    half = T_975[len(diffs) - 1] * std / math.sqrt(len(diffs))
    return mean, std, mean - half, mean + half


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--summary", action="store_true", help="only the rows behind REPORT.md's summary table")
    args = parser.parse_args()
    studies = json.loads(args.results.read_text())["studies"]
    print("| § | comparison (arm − baseline, same seed) | metric | Δ mean ± std | 95% interval | seeds > 0 / < 0 |")
    print("|---|---|---|---|---|---|")
    for section, label, (base_study, base_variant), (arm_study, arm_variant), metric, summary in comparisons():
        if args.summary and not summary:
            continue
        name, key, scale, decimals = metric
        base = per_seed(studies, base_study, base_variant, key, scale)
        arm = per_seed(studies, arm_study, arm_variant, key, scale)
        seeds = sorted(set(base) & set(arm))
        if len(seeds) < 2:
            print(f"| {section} | {label} | {name} | per-seed data not stored | – | – |")
            continue
        diffs = [arm[seed] - base[seed] for seed in seeds]
        mean, std, low, high = interval(diffs)
        f = f".{decimals + 1}f"  # one digit more than the report's tables, so that small intervals keep their sign
        print(f"| {section} | {label} | {name} | {mean:+{f}} ± {std:{f}} | [{low:+{f}}, {high:+{f}}] | "
              f"{sum(d > TIE for d in diffs)} / {sum(d < -TIE for d in diffs)} of {len(diffs)} |")


if __name__ == "__main__":
    main()
