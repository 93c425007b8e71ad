"""Tables, paired intervals and the figure of REPORT.md §9 (the margin family on noisy captions).

Reads the ``ablation.json`` files that ``margin_family.py`` wrote under ``--runs`` and prints every
table as markdown: cells are mean ± sample std over seeds 0-4; a Δ is the paired difference (arm −
reference, same seed) as mean ± std, its 95% Student-t interval (``intervals.py``) and the seeds above
/ below 0. Writes ``scripts/studies/figures/margin_family_noise.png`` (accuracy against the corruption
rate, one line per loss, meta weighting off and on) and every run's numbers into
``scripts/studies/figures/margin_family_results.json``. Nothing is retrained; a cell whose runs have
not finished is printed as ``–``.

    python scripts/studies/margin_family_report.py --runs runs/study2/margin_family
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cached_figures import curve  # noqa: E402  (the study scripts are not a package)
from intervals import TIE, interval  # noqa: E402
from margin_family import CGD_DEFAULT, FACE_AB, LOSSES, RSUM  # noqa: E402

FIGURES = Path(__file__).resolve().parent / "figures"
LEVELS = ("00", "20", "40")
ACCURACY, WEIGHT_AUROC = "ood/id_accuracy", "weights/auroc_clean_vs_mismatched"
LABELS = {"clip": "CLIP", "angular_margin": "angular margin (MAMA)", "cosface": "CosFace", "arcface": "ArcFace",
          "sphereface_r": "SphereFace-R", "cam_softmax": "Cam-Softmax", "sface": "SFace", "sphereface2": "SphereFace2"}


def load(path: Path) -> dict[str, Any] | None:
    """An ``ablation.json`` (None: not finished)."""
    return json.loads(path.read_text()) if path.is_file() else None


def per_seed(results: dict[str, Any] | None, variant: str | None = None, key: str = ACCURACY,
             scale: float = 100.0) -> dict[int, float]:
    """seed -> value of ``key`` for ``variant`` (the study's only variant when None); {} when not finished."""
    if results is None:
        return {}
    return {run["seed"]: scale * run["metrics"][key] for run in results["runs"]
            if (variant is None or run["variant"] == variant) and run["metrics"].get(key) is not None}


def cell(values: dict[int, float], decimals: int = 1) -> str:
    """mean ± sample std, or – when fewer than 2 seeds."""
    if len(values) < 2:
        return "–"
    data = list(values.values())
    return f"{statistics.fmean(data):.{decimals}f} ± {statistics.stdev(data):.{decimals}f}"


def delta(arm: dict[int, float], reference: dict[int, float], decimals: int = 1) -> str:
    """Paired Δ (arm − reference over their common seeds): mean ± std [95% interval] (seeds > 0 / < 0)."""
    seeds = sorted(set(arm) & set(reference))
    if len(seeds) < 2:
        return "–"
    diffs = [arm[seed] - reference[seed] for seed in seeds]
    mean, std, low, high = interval(diffs)
    f = f".{decimals}f"
    return (f"{mean:+{f}} ± {std:{f}} [{low:+{f}}, {high:+{f}}] "
            f"({sum(d > TIE for d in diffs)}/{sum(d < -TIE for d in diffs)})")


def skipped(root: Path, loss: str) -> str:
    """Non-finite steps skipped, summed over the last-block runs of ``loss`` (meta off / on)."""
    counts = []
    for study in (root / "lastblock" / loss, root / "lastblock_meta" / loss):
        results = load(study / "ablation.json")
        counts.append(str(sum(run["training"]["nonfinite_steps_skipped"] for run in results["runs"]))
                      if results else "–")
    return " / ".join(counts)


def lastblock_tables(root: Path, heads_off: dict[str, dict[int, float]], heads_on: dict[str, dict[int, float]],
                     stored: dict[str, Any]) -> None:
    """The 40% arms with the last block of each tower trainable, against the heads-only arms (same seeds)."""
    last_off = {loss: per_seed(load(root / "lastblock" / loss / "ablation.json")) for loss in LOSSES}
    last_on = {loss: per_seed(load(root / "lastblock_meta" / loss / "ablation.json")) for loss in LOSSES}
    auroc = {loss: per_seed(load(root / "lastblock_meta" / loss / "ablation.json"), key=WEIGHT_AUROC, scale=1.0)
             for loss in LOSSES}
    for loss in LOSSES:
        stored[f"40/lastblock/{loss}/off"], stored[f"40/lastblock/{loss}/on"] = last_off[loss], last_on[loss]
    print("\nThe last block of each tower trainable too (40%, each loss at its heads-only choice), seeds 0-4.\n")
    print("| loss | heads only, off | last block, off | Δ last block − heads | Δ − CLIP (last block) | "
          "last block + meta | Δ meta on − off | weight AUROC | non-finite steps skipped |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for loss in LOSSES:
        print(f"| {LABELS[loss]} | {cell(heads_off[loss])} | {cell(last_off[loss])} | "
              f"{delta(last_off[loss], heads_off[loss])} | "
              f"{delta(last_off[loss], last_off['clip']) if loss != 'clip' else '–'} | {cell(last_on[loss])} | "
              f"{delta(last_on[loss], last_off[loss])} | {cell(auroc[loss], 3)} | {skipped(root, loss)} |")
    done = [loss for loss in LOSSES if len(last_off[loss]) >= 2]
    if done:
        mean = lambda values: statistics.fmean(values.values())  # noqa: E731
        best = max(done, key=lambda loss: mean(last_off[loss]))
        best_heads = max(LOSSES, key=lambda loss: mean(heads_off[loss]) if heads_off[loss] else float("-inf"))
        print("\n| comparison (last block, 40%; \"best\" chosen after the fact) | Δ accuracy, paired |\n|---|---|")
        print(f"| {LABELS[best]} (best without clean data) − CLIP | {delta(last_off[best], last_off['clip'])} |")
        print(f"| angular margin + meta − {LABELS[best]} | {delta(last_on['angular_margin'], last_off[best])} |")
        with_meta = [loss for loss in LOSSES if len(last_on[loss]) >= 2]
        best_on = max(with_meta, key=lambda loss: mean(last_on[loss])) if with_meta else "angular_margin"
        if best_on != "angular_margin":
            print(f"| {LABELS[best_on]} + meta (best with meta) − {LABELS[best]} | "
                  f"{delta(last_on[best_on], last_off[best])} |")
        if best != best_heads:
            print(f"| {LABELS[best]} − {LABELS[best_heads]} (the heads-only best), last block | "
                  f"{delta(last_off[best], last_off[best_heads])} |")
        print(f"| {LABELS[best]}, last block − {LABELS[best_heads]}, heads only | "
              f"{delta(last_off[best], heads_off[best_heads])} |")
        print(f"| angular margin + meta, last block − heads only | "
              f"{delta(last_on['angular_margin'], heads_on['angular_margin'])} |")
    # whether 400 steps is past each arm's validation peak, heads only and last block alike (REPORT: convergence)
    print("\nValidation t2v R@10 (every 25 steps, meta off): the step of its peak and last − peak, means over "
          "seeds.\n\n| loss | heads only: peak step | heads only: last − peak | last block: peak step | "
          "last block: last − peak |\n|---|---|---|---|---|")
    for loss in LOSSES:
        cells = []
        for study in (root / "final" / loss, root / "lastblock" / loss):
            results = load(study / "ablation.json")
            runs = [run for run in results["runs"] if "+meta" not in run["variant"]] if results else []
            found = [curve(run["run_dir"], "val/t2v/R@10") for run in runs]
            found = [(steps, values) for steps, values in found if values]
            if not found:
                cells += ["–", "–"]
                continue
            peaks = [steps[values.index(max(values))] for steps, values in found]
            cells += [f"{statistics.fmean(peaks):.0f}",
                      f"{statistics.fmean(values[-1] - max(values) for _, values in found):+.2f}"]
        print(f"| {LABELS[loss]} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("runs/study2/margin_family"))
    args = parser.parse_args()
    stored: dict[str, Any] = {}
    off: dict[str, dict[str, dict[int, float]]] = {}
    on: dict[str, dict[str, dict[int, float]]] = {}
    early: dict[str, dict[str, dict[int, float]]] = {}
    for level in LEVELS:
        root = args.runs / f"cifar_{level}"
        choices_file = root / "choices.json"
        choices = json.loads(choices_file.read_text()) if choices_file.is_file() else {}
        print(f"\n### {int(level)}% corrupted captions\n")
        print("Tuning (seed 5, meta off): class accuracy % on the validation split; the chosen value in bold.\n")
        print("| loss | candidates | chosen |\n|---|---|---|")
        for loss, candidates in LOSSES.items():
            shown = []
            for label, _, _ in candidates:
                found = per_seed(load(root / "tune" / loss / label.replace("=", "_") / "ablation.json"))
                value = f"{label}: {found[5]:.1f}" if 5 in found else f"{label}: –"
                shown.append(f"**{value}**" if choices.get(loss) == label else value)
                stored[f"{level}/tune/{loss}/{label}"] = found
            print(f"| {LABELS[loss]} | {', '.join(shown)} | {choices.get(loss, '–')} |")
        print("\nTest class accuracy % at the chosen value, seeds 0-4; Δ paired, mean ± std [95% interval] "
              "(seeds > 0 / < 0).\n")
        header = "| loss | meta off | meta on | Δ on − off | weight AUROC (on) | Δ off − CLIP off |"
        if level != "00":
            header += " early-stopped (step) | Δ early − off | Δ on − early |"
        print(header)
        print("|" + "---|" * (header.count("|") - 1))
        off[level], on[level], early[level] = {}, {}, {}
        for loss in LOSSES:
            final = load(root / "final" / loss / "ablation.json")
            variants = list(final["variants"]) if final else []
            off[level][loss] = per_seed(final, variants[0]) if final else {}
            on[level][loss] = per_seed(final, variants[1]) if final else {}
            auroc = per_seed(final, variants[1], WEIGHT_AUROC, 1.0) if final else {}
            stored[f"{level}/final/{loss}/off"], stored[f"{level}/final/{loss}/on"] = off[level][loss], on[level][loss]
            row = (f"| {LABELS[loss]} | {cell(off[level][loss])} | {cell(on[level][loss])} | "
                   f"{delta(on[level][loss], off[level][loss])} | {cell(auroc, 3) if level != '00' else '–'} | "
                   f"{delta(off[level][loss], off[level]['clip']) if loss != 'clip' else '–'} |")
            if level != "00":
                stopped = load(root / "early" / loss / "ablation.json")
                early[level][loss] = per_seed(stopped)
                stored[f"{level}/early/{loss}"] = early[level][loss]
                steps = stopped["base_config"]["train"]["max_steps"] if stopped else "–"
                row += (f" {cell(early[level][loss])} ({steps}) | {delta(early[level][loss], off[level][loss])} | "
                        f"{delta(on[level][loss], early[level][loss])} |")
            print(row)
        if level != "00" and all(len(off[level][loss]) >= 2 for loss in LOSSES):
            mean = lambda values: statistics.fmean(values.values())  # noqa: E731
            best_off = max(LOSSES, key=lambda loss: mean(off[level][loss]))
            rows = [(f"{LABELS[best_off]} (best without clean data) − CLIP", off[level][best_off], off[level]["clip"])]
            if all(len(on[level][loss]) >= 2 for loss in LOSSES):
                best_on = max(LOSSES, key=lambda loss: mean(on[level][loss]))
                rows += [(f"angular margin + meta (§5's method) − {LABELS[best_off]}", on[level]["angular_margin"],
                          off[level][best_off]),
                         (f"{LABELS[best_on]} + meta (best with meta) − {LABELS[best_off]}", on[level][best_on],
                          off[level][best_off])]
            if all(len(early[level].get(loss, {})) >= 2 for loss in LOSSES):
                best_early = max(LOSSES, key=lambda loss: mean(early[level][loss]))
                rows.append((f"{LABELS[best_early]} stopped early (best early-stopped) − {LABELS[best_off]}",
                             early[level][best_early], off[level][best_off]))
            print(f"\nThe questions at {int(level)}% (\"best\" = highest mean test accuracy of its column, so these "
                  "Δs are chosen after the fact):\n")
            print("| comparison | Δ accuracy, paired |\n|---|---|")
            for label, arm, reference in rows:
                print(f"| {label} | {delta(arm, reference)} |")
        if level == "40":
            print("\nCGD at 40%: the other `detach` setting − the term's default, meta off, seeds 0-4.\n")
            print("| term | default detach | accuracy, default | accuracy, other setting | Δ other − default | "
                  "non-finite steps skipped (default / other, 5 runs) |\n|---|---|---|---|---|---|")
            for loss, default in CGD_DEFAULT.items():
                results = load(root / "cgd" / loss / "ablation.json")
                other = per_seed(results)
                stored[f"{level}/cgd/{loss}"] = other
                final = load(root / "final" / loss / "ablation.json")
                skipped = [sum(run["training"].get("nonfinite_steps_skipped", 0) for run in found["runs"]
                               if "+meta" not in run["variant"]) if found else "–" for found in (final, results)]
                print(f"| {LABELS[loss]} | {default} | {cell(off[level][loss])} | {cell(other)} | "
                      f"{delta(other, off[level][loss])} | {skipped[0]} / {skipped[1]} |")
        if level != "00":
            ab_file = root / "sface_ab.json"
            measured = json.loads(ab_file.read_text()) if ab_file.is_file() else None
            results = load(root / "sface_ab" / "ablation.json")
            names = list(results["variants"]) if results else []
            face = per_seed(results, names[0]) if results else {}
            measured_acc = per_seed(results, names[1]) if results else {}
            stored[f"{level}/sface_ab/face"], stored[f"{level}/sface_ab/measured"] = face, measured_acc
            ab = f"a {measured['a']:.3f}, b {measured['b']:.3f}" if measured else "–"
            print(f"\nSFace's a, b at {int(level)}% (meta off): face values (a {FACE_AB[0]}, b {FACE_AB[1]}), "
                  f"measured ({ab}), and the defaults (a 1.0, b 1.5; the final runs).\n")
            print("| a, b | accuracy | Δ − face values |\n|---|---|---|")
            print(f"| face | {cell(face)} | – |")
            print(f"| measured | {cell(measured_acc)} | {delta(measured_acc, face)} |")
            print(f"| defaults | {cell(off[level]['sface'])} | {delta(off[level]['sface'], face)} |")
            print(f"\nmeasured − defaults: {delta(measured_acc, off[level]['sface'])}")
        if level == "40" and (root / "lastblock").is_dir():
            lastblock_tables(root, off[level], on[level], stored)
    coco = args.runs / "coco"
    if (coco / "choices.json").is_file() or (coco / "tune").is_dir():
        choices_file = coco / "choices.json"
        choices = json.loads(choices_file.read_text()) if choices_file.is_file() else {}
        print("\n### COCO caption retrieval\n")
        print("Tuning (seed 5, meta off): R@1 + R@5 + R@10 both ways on the 12 validation images; the chosen value "
              "in bold.\n")
        print("| loss | candidates | chosen |\n|---|---|---|")
        for loss, candidates in LOSSES.items():
            shown = []
            for label, _, _ in candidates:
                found = load(coco / "tune" / loss / label.replace("=", "_") / "ablation.json")
                value = f"{label}: {sum(found['runs'][0]['metrics'][key] for key in RSUM):.1f}" if found \
                    else f"{label}: –"
                shown.append(f"**{value}**" if choices.get(loss) == label else value)
            print(f"| {LABELS[loss]} | {', '.join(shown)} | {choices.get(loss, '–')} |")
        print("\nTest (the 79 val2017 images, 395 captions), seeds 0-4: R@1 % both ways.\n")
        print("| loss | t2v R@1 off | t2v R@1 on | Δ on − off | Δ off − CLIP off | v2t R@1 off | Δ off − CLIP off |")
        print("|---|---|---|---|---|---|---|")
        found = {loss: load(coco / "final" / loss / "ablation.json") for loss in LOSSES}
        def metric(loss, index, key):
            results = found[loss]
            return per_seed(results, list(results["variants"])[index], key, 1.0) if results else {}
        for loss in LOSSES:
            t2v_off, t2v_on = metric(loss, 0, "t2v/R@1"), metric(loss, 1, "t2v/R@1")
            v2t_off = metric(loss, 0, "v2t/R@1")
            stored[f"coco/final/{loss}/off/t2v_R@1"], stored[f"coco/final/{loss}/on/t2v_R@1"] = t2v_off, t2v_on
            stored[f"coco/final/{loss}/off/v2t_R@1"] = v2t_off
            clip = (metric("clip", 0, "t2v/R@1"), metric("clip", 0, "v2t/R@1"))
            print(f"| {LABELS[loss]} | {cell(t2v_off)} | {cell(t2v_on)} | {delta(t2v_on, t2v_off)} | "
                  f"{delta(t2v_off, clip[0]) if loss != 'clip' else '–'} | {cell(v2t_off)} | "
                  f"{delta(v2t_off, clip[1]) if loss != 'clip' else '–'} |")
    FIGURES.mkdir(exist_ok=True)
    (FIGURES / "margin_family_results.json").write_text(json.dumps(
        {key: {str(seed): value for seed, value in values.items()} for key, values in stored.items()}, indent=1))
    figure = Figure(figsize=(8, 4.5))
    axes = figure.subplots(1, 2, sharey=True)
    for ax, (title, table) in zip(axes, (("meta weighting off", off), ("meta weighting on", on))):
        for loss in LOSSES:
            points = [(int(level), statistics.fmean(table[level][loss].values())) for level in LEVELS
                      if len(table.get(level, {}).get(loss, {})) >= 2]
            if points:
                ax.plot(*zip(*points), marker="o", label=LABELS[loss])
        ax.set_title(title)
        ax.set_xlabel("corrupted captions %")
        ax.set_xticks([0, 20, 40])
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test class accuracy % (mean of 5 seeds)")
    axes[1].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(FIGURES / "margin_family_noise.png", dpi=120)
    print(f"\nwrote {FIGURES / 'margin_family_noise.png'} and {FIGURES / 'margin_family_results.json'}")


if __name__ == "__main__":
    main()
