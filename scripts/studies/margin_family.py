"""The margin-family study of REPORT.md §9: noisy captions on CIFAR-10, eight losses, meta weighting off and on.

Per corruption level (40%, 20%, 0%; the order runs the most telling level first):
1. **tune**: each loss's main hyperparameter (CLIP: the learning rate, the only knob it has) from 3
   values, one run each at the tuning seed (5, not among the reported seeds 0-4), meta weighting off,
   the value with the best class accuracy on the clean validation split (never the test set);
2. **final**: each loss at its chosen value, seeds 0-4, meta weighting off and on (``NAME+meta``);
3. **early** (20%, 40%): each loss stopped early, at the step where its tuning run's validation
   t2v R@10 peaked (to 25 steps), seeds 0-4: early stopping with a clean set;
4. **cgd** (40%): the terms with a ``detach`` option with the other setting, seeds 0-4;
5. **sface_ab** (20%, 40%): SFace with the face values (a 0.8, b 1.23) and with a, b measured by
   ``mmsphere sface-ab`` on the first 4 batches, seeds 0-4;
6. **lastblock** (40%, ``--lastblock``): each loss at the value chosen in 1. with the last block of each tower
   trainable as well (``configs/studies/cifar10_noisy_lastblock.yaml``), seeds 0-4 meta off, and meta on for the
   losses of ``--lastblock-meta``. Not re-tuned: every arm keeps the value the heads-only tuning chose for it.
Then COCO retrieval (``configs/studies/coco_family.yaml``: the coco_mini training images split by image
into 60 train, 8 meta and 12 validation images; the 79 val2017 images are the test set): the same
tuning, chosen by R@1 + R@5 + R@10 both ways on the validation images, then seeds 0-4 meta off and on.
Every step is ``scripts/ablate.py`` (finished runs are reused, so an interrupted study continues);
``--jobs`` invocations run side by side. Needs the data of ``prompt_data.sh`` (``margin_family.sh`` makes it).

    python scripts/studies/margin_family.py [--out runs/study2/margin_family] [--jobs 2] [--levels 40,20,00]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import random
import subprocess
import sys
from pathlib import Path

CONFIG = "configs/studies/cifar10_noisy.yaml"
LASTBLOCK_CONFIG = "configs/studies/cifar10_noisy_lastblock.yaml"
ALL10 = "runs/study2/cifar/all10"
TUNING_SEED = 5
# each loss: its main hyperparameter's three candidates, as (label, variant, extra overrides)
LOSSES: dict[str, list[tuple[str, str, list[str]]]] = {
    "clip": [(f"lr={lr}", "clip", [f"train.lr={lr}"]) for lr in ("1.0e-3", "2.0e-3", "4.0e-3")],
    "angular_margin": [(f"margin={m}", f"angular_margin:margin={m}", []) for m in (0.05, 0.1, 0.2)],
    "cosface": [(f"margin={m}", f"cosface:margin={m}", []) for m in (0.05, 0.1, 0.2)],
    "arcface": [(f"margin={m}", f"arcface:margin={m}", []) for m in (0.05, 0.1, 0.2)],
    "sphereface_r": [(f"margin={m}", f"sphereface_r:margin={m}", []) for m in (1.05, 1.1, 1.2)],
    # c_decay 1e-3 per step: c reaches c_stop within the first 60-220 of the 400 steps
    "cam_softmax": [(f"c_stop={c}", f"cam_softmax:c_stop={c},c_decay=0.001", []) for c in (1.5, 1.45, 1.35)],
    "sface": [(f"k={k}", f"sface:k={k}", []) for k in (10, 20, 40)],
    "sphereface2": [(f"margin={m}", f"sphereface2:margin={m}", []) for m in (0.05, 0.1, 0.2)],
}
# the terms with characteristic gradient detachment, and their default
CGD_DEFAULT = {"cosface": False, "arcface": False, "sphereface_r": True, "cam_softmax": False, "sphereface2": True}
FACE_AB = (0.8, 1.23)


def ablate(out: Path, variants: list[str], level: str, *, seeds: int, seed: int = 0, overrides: list[str] = (),
           evaluate_on: str = "test", config: str = CONFIG) -> list[str]:
    """The ``scripts/ablate.py`` command of one study cell (``evaluate_on``: ``val`` for tuning, ``test`` otherwise)."""
    images = f"{ALL10}/val/shard-000000.tar" if evaluate_on == "val" else f"{ALL10}/test/shard-{{000000..000003}}.tar"
    train = f"[{{name: cifar10_train, urls: '{ALL10}/train_{level}/shard-{{000000..000009}}.tar', modality: image}}]"
    command = [sys.executable, "scripts/ablate.py", "--config", config, "--variants", ",".join(variants),
               "--seeds", str(seeds), "--out", str(out), "--ood-id", images, "--classes", f"{ALL10}/classes.txt",
               "--eval-batch-size", "500", f"data.train={train}", f"seed={seed}", *overrides]
    if evaluate_on == "test":
        command[command.index("--eval-batch-size"):command.index("--eval-batch-size")] = [
            "--mismatched-keys", f"{ALL10}/mismatched_{level}.txt"]
    return command


COCO_CONFIG = "configs/studies/coco_family.yaml"
COCO = "runs/study2/coco_family"
COCO_TEST = "{name: coco_test, urls: 'runs/study2/coco/val/shard-000000.tar', modality: image}"
RSUM = ("t2v/R@1", "t2v/R@5", "t2v/R@10", "v2t/R@1", "v2t/R@5", "v2t/R@10")


def prepare_coco(captions: Path = Path("runs/study2/coco/train_captions.jsonl")) -> None:
    """Split the coco_mini training images (seeded, by image) into 60 train, 8 meta and 12 validation images."""
    if (Path(COCO) / "val" / "sizes.json").is_file():
        return
    rows = [json.loads(line) for line in captions.read_text().splitlines()]
    groups = sorted({row["group"] for row in rows})
    random.Random(0).shuffle(groups)
    meta, val = set(groups[:8]), set(groups[8:20])
    split = {"train": [row for row in rows if row["group"] not in meta | val],
             "meta": [row for row in rows if row["group"] in meta]}
    images: dict[str, dict] = {}
    for row in rows:  # validation: one row per image with all its captions, as the test set
        if row["group"] in val:
            images.setdefault(row["group"], {"key": row["group"], "path": row["path"], "captions": []})
            images[row["group"]]["captions"] += row["captions"]
    split["val"] = list(images.values())
    for name, chosen_rows in split.items():
        listing = Path(COCO) / f"{name}.jsonl"
        listing.parent.mkdir(parents=True, exist_ok=True)
        listing.write_text("".join(json.dumps(row) + "\n" for row in chosen_rows))
        subprocess.run([sys.executable, "scripts/make_shards.py", "--input", str(listing), "--out",
                        str(Path(COCO) / name), "--maxcount", "400", "--quiet"], check=True)


def coco_ablate(out: Path, variants: list[str], *, seeds: int, seed: int = 0, overrides: list[str] = (),
                evaluate_on: str = "test") -> list[str]:
    """The ``scripts/ablate.py`` command of one COCO cell: retrieval on the validation split or on the test set."""
    command = [sys.executable, "scripts/ablate.py", "--config", COCO_CONFIG, "--variants", ",".join(variants),
               "--seeds", str(seeds), "--out", str(out), "--eval-batch-size", "500", f"seed={seed}", *overrides]
    if evaluate_on == "test":  # the test images are never seen during training: no validation passes
        command += [f"data.val={COCO_TEST}", "train.val_every=0"]
    return command


def run_all(commands: list[tuple[Path, list[str]]], jobs: int) -> None:
    """Run each (out, command) whose ``ablation.json`` is missing, ``jobs`` at a time; stop on the first failure."""
    todo = [(out, command) for out, command in commands if not (out / "ablation.json").is_file()]

    def one(item: tuple[Path, list[str]]) -> None:
        out, command = item
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "ablate.log", "w") as log:
            log.write(" ".join(command) + "\n")
            log.flush()
            result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
        if result.returncode:
            raise RuntimeError(f"{' '.join(command)} failed (exit {result.returncode}); see {out / 'ablate.log'}")

    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        for future in concurrent.futures.as_completed([pool.submit(one, item) for item in todo]):
            future.result()


def runs_of(out: Path) -> list[dict]:
    """The records of every run of an ablation folder."""
    return json.loads((out / "ablation.json").read_text())["runs"]


def chosen(tune: Path, loss: str, metric=lambda metrics: metrics["ood/id_accuracy"]) -> tuple[str, str, list[str]]:
    """The candidate of ``loss`` with the best validation ``metric`` (default class accuracy; ties: the first listed)."""
    scores = []
    for label, variant, overrides in LOSSES[loss]:
        (run,) = runs_of(tune / loss / label.replace("=", "_"))
        scores.append((metric(run["metrics"]), label, variant, overrides))
    best = max(scores, key=lambda item: item[0])
    return best[1:]


def best_step(tune: Path, loss: str, label: str) -> int:
    """The step (a multiple of 25, at least 50) where the tuning run's validation t2v R@10 peaked first."""
    (run,) = runs_of(tune / loss / label.replace("=", "_"))
    curve = [json.loads(line) for line in (Path(run["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    points = [(row["step"], row["val/t2v/R@10"]) for row in curve if "val/t2v/R@10" in row]
    top = max(value for _, value in points)
    return max(50, min(step for step, value in points if value == top))


def measured_ab(level: str) -> tuple[float, float]:
    """SFace's a, b measured as ``mmsphere sface-ab`` does, on the level's training set (seed 0's stream)."""
    from mmsphere.train.config import load_config
    from mmsphere.train.sface_ab import measured_sface_ab

    train = f"[{{name: cifar10_train, urls: '{ALL10}/train_{level}/shard-{{000000..000009}}.tar', modality: image}}]"
    a, b = measured_sface_ab(load_config(CONFIG, [f"data.train={train}", "seed=0"]), batches=4)
    return round(a, 4), round(b, 4)


def main() -> int:
    """Run every phase of every level in turn."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/study2/margin_family", type=Path)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--levels", default="40,20,00", help="CIFAR-10 corruption levels ('' for none)")
    parser.add_argument("--coco", action=argparse.BooleanOptionalAction, default=True, help="the COCO part")
    parser.add_argument("--lastblock", action="store_true", help="the 40%% arms with the last blocks trainable")
    parser.add_argument("--lastblock-meta", default="angular_margin,clip,arcface,cam_softmax",
                        help="the losses whose last-block arm also runs with meta weighting")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    for level in filter(None, args.levels.split(",")):
        root = args.out / f"cifar_{level}"
        tune = root / "tune"
        run_all([(tune / loss / label.replace("=", "_"),
                  ablate(tune / loss / label.replace("=", "_"), [variant], level, seeds=1, seed=TUNING_SEED,
                         overrides=overrides, evaluate_on="val"))
                 for loss, candidates in LOSSES.items() for label, variant, overrides in candidates], args.jobs)
        choices = {loss: chosen(tune, loss) for loss in LOSSES}
        (root / "choices.json").write_text(json.dumps({loss: label for loss, (label, _, _) in choices.items()}, indent=2))
        commands = [(root / "final" / loss, ablate(root / "final" / loss, [variant, _with_meta(variant)], level,
                                                   seeds=5, overrides=overrides))
                    for loss, (label, variant, overrides) in choices.items()]
        if level != "00":
            for loss, (label, variant, overrides) in choices.items():
                steps = best_step(tune, loss, label)
                commands.append((root / "early" / loss, ablate(
                    root / "early" / loss, [variant], level, seeds=5,
                    overrides=[*overrides, f"train.max_steps={steps}", f"train.warmup_steps={max(1, steps // 20)}",
                               f"train.checkpoint_every={steps}"])))
            sface_variant = choices["sface"][1]
            a, b = measured_ab(level)
            (root / "sface_ab.json").write_text(json.dumps({"a": a, "b": b}))
            commands.append((root / "sface_ab", ablate(
                root / "sface_ab", [f"{sface_variant},a={FACE_AB[0]},b={FACE_AB[1]}", f"{sface_variant},a={a},b={b}"],
                level, seeds=5)))
        if level == "40":
            for loss, default in CGD_DEFAULT.items():
                label, variant, overrides = choices[loss]
                commands.append((root / "cgd" / loss, ablate(root / "cgd" / loss, [f"{variant},detach={not default}"],
                                                            level, seeds=5, overrides=overrides)))
        run_all(commands, args.jobs)
        if args.lastblock and level == "40":
            lastblock_phase(root, args.lastblock_meta.split(","), args.jobs)
    if args.coco:
        coco_study(args.out / "coco", args.jobs)
    return 0


def lastblock_phase(root: Path, with_meta: list[str], jobs: int) -> None:
    """Each loss at its chosen value with the last block of each tower trainable, seeds 0-4, meta off (and on)."""
    choices = {loss: chosen(root / "tune", loss) for loss in LOSSES}
    # the robust and the reference losses first, so that an interrupted phase has the telling pairs
    order = ["clip", "arcface", "cam_softmax", "angular_margin", "sface", "sphereface2", "cosface", "sphereface_r"]
    commands, meta_commands = [], []
    for loss in order:
        label, variant, overrides = choices[loss]
        commands.append((root / "lastblock" / loss, ablate(root / "lastblock" / loss, [variant], "40", seeds=5,
                                                           overrides=overrides, config=LASTBLOCK_CONFIG)))
        if loss in with_meta:
            meta = (root / "lastblock_meta" / loss, ablate(root / "lastblock_meta" / loss, [_with_meta(variant)], "40",
                                                           seeds=5, overrides=overrides, config=LASTBLOCK_CONFIG))
            # MAMA + meta is the reference of the "how close to meta weighting" question: right after its own arm
            (commands if loss == "angular_margin" else meta_commands).append(meta)
    commands += meta_commands
    run_all(commands, jobs)


def coco_study(root: Path, jobs: int) -> None:
    """COCO retrieval: tuning by the validation split's R@1+R@5+R@10 both ways, then seeds 0-4 meta off and on."""
    prepare_coco()
    tune = root / "tune"
    run_all([(tune / loss / label.replace("=", "_"),
              coco_ablate(tune / loss / label.replace("=", "_"), [variant], seeds=1, seed=TUNING_SEED,
                          overrides=overrides, evaluate_on="val"))
             for loss, candidates in LOSSES.items() for label, variant, overrides in candidates], jobs)
    choices = {loss: chosen(tune, loss, lambda metrics: sum(metrics[key] for key in RSUM)) for loss in LOSSES}
    (root / "choices.json").write_text(json.dumps({loss: label for loss, (label, _, _) in choices.items()}, indent=2))
    run_all([(root / "final" / loss, coco_ablate(root / "final" / loss, [variant, _with_meta(variant)], seeds=5,
                                                 overrides=overrides))
             for loss, (label, variant, overrides) in choices.items()], jobs)


def _with_meta(variant: str) -> str:
    name, colon, options = variant.partition(":")
    return f"{name}+meta{colon}{options}"


if __name__ == "__main__":
    sys.exit(main())
