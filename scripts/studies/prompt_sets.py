"""Sample lists of the CIFAR-10 class-prompt studies (REPORT.md §5-§8), for ``scripts/make_shards.py``.

Every row: ``{"key": "<class>_NNNN", "path": ..., "captions": five CLIP-style prompts, "group": <class>}``
(the group is the true class: ``loss.positives: group`` and the ID accuracy read it). Per class, images
0000-0499 are training pairs, 0500-0539 retrieval validation, 0540-0599 the clean meta set, 0600-0799
the test images. Two task families:

- ``all10/``: all ten classes; ``train_NN.jsonl`` with NN% of the training pairs (a seeded choice)
  captioned with the prompts of another class (drawn uniformly from the other nine), their keys in
  ``mismatched_NN.txt``; ``meta.jsonl`` (clean), ``val.jsonl``, ``test.jsonl`` and ``classes.txt``.
- ``id5/``: ID = airplane, automobile, bird, cat, deer; OoD = dog, frog, horse, ship, truck;
  ``train.jsonl``, ``val.jsonl``, ``id_test.jsonl``, ``ood_test.jsonl`` and ``id_classes.txt``.

    python scripts/studies/prompt_sets.py --cifar runs/cifar10/test --out runs/study2/cifar
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ID_CLASSES = ["airplane", "automobile", "bird", "cat", "deer"]
OOD_CLASSES = ["dog", "frog", "horse", "ship", "truck"]
TEMPLATES = ["a photo of a {}.", "a blurry photo of a {}.", "a low resolution photo of a {}.",
             "a close-up photo of a {}.", "a picture of a {}."]
RANGES = {"train": range(0, 500), "val": range(500, 540), "meta": range(540, 600), "test": range(600, 800)}
NOISE_LEVELS = (0, 20, 40)


def rows(cifar: Path, classes: list[str], split: str, captioned_as: dict[str, str] | None = None) -> list[dict]:
    """One row per image of ``split`` of ``classes``; ``captioned_as`` maps a key to the class its prompts name."""
    found = []
    for name in classes:
        for index in RANGES[split]:
            key = f"{name}_{index:04d}"
            path = cifar / name / f"{index:04d}.jpg"
            if not path.is_file():
                raise SystemExit(f"prompt_sets: {path} is missing: untar cifar10_test_jpg.tar into --cifar's parent")
            named = (captioned_as or {}).get(key, name)
            found.append({"key": key, "path": str(path), "captions": [t.format(named) for t in TEMPLATES],
                          "group": name})
    return found


def write(path: Path, items: list[dict]) -> None:
    """Write a JSONL file (its folder created), rows in a seeded random order.

    Shuffled so that every shard holds every class: a training stream's shuffle buffer mixes only
    nearby samples, and shards of one class each would make class-skewed batches.
    """
    items = list(items)
    random.Random(path.name).shuffle(items)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(item) + "\n" for item in items))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cifar", type=Path, required=True, help="the untarred test/ folder: test/<class>/NNNN.jpg")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0, help="seed of the corrupted-caption choice")
    args = parser.parse_args()
    cifar = args.cifar.resolve()
    classes = ID_CLASSES + OOD_CLASSES
    all10 = args.out / "all10"
    clean = rows(cifar, classes, "train")
    for level in NOISE_LEVELS:
        rng = random.Random(args.seed * 1000 + level)
        corrupted = sorted(rng.sample([row["key"] for row in clean], len(clean) * level // 100))
        captioned_as = {key: rng.choice([name for name in classes if name != key.rsplit("_", 1)[0]])
                        for key in corrupted}
        write(all10 / f"train_{level:02d}.jsonl", rows(cifar, classes, "train", captioned_as))
        (all10 / f"mismatched_{level:02d}.txt").write_text("".join(key + "\n" for key in corrupted))
    for split in ("meta", "val", "test"):
        write(all10 / f"{split}.jsonl", rows(cifar, classes, split))
    (all10 / "classes.txt").write_text("\n".join(classes) + "\n")
    id5 = args.out / "id5"
    write(id5 / "train.jsonl", rows(cifar, ID_CLASSES, "train"))
    write(id5 / "val.jsonl", rows(cifar, ID_CLASSES, "val"))
    write(id5 / "id_test.jsonl", rows(cifar, ID_CLASSES, "test"))
    write(id5 / "ood_test.jsonl", rows(cifar, OOD_CLASSES, "test"))
    (id5 / "id_classes.txt").write_text("\n".join(ID_CLASSES) + "\n")
    print(f"{args.out}: all10/ (train at {NOISE_LEVELS}% corrupted captions, meta, val, test) and id5/")


if __name__ == "__main__":
    main()
