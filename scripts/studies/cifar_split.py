"""Split the CIFAR-10 test set by class for the OoD study (REPORT.md §3).

ID classes: airplane, automobile, bird, cat, deer; OoD classes: dog, frog, horse, ship, truck. Per ID
class, images 0000-0499 are fine-tuning pairs (captioned with five CLIP-style class prompts), 0500-0539
the retrieval validation pairs, and 0600-0799 the held-out ID test images; per OoD class, 0600-0799
are the OoD test images. Test images are linked, not copied.

    python scripts/studies/cifar_split.py --cifar runs/cifar10/test --out runs/study/cifar
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

ID_CLASSES = ["airplane", "automobile", "bird", "cat", "deer"]
OOD_CLASSES = ["dog", "frog", "horse", "ship", "truck"]
TEMPLATES = ["a photo of a {}.", "a blurry photo of a {}.", "a low resolution photo of a {}.",
             "a close-up photo of a {}.", "a picture of a {}."]
SPLITS = {"train": range(0, 500), "val": range(500, 540), "test": range(600, 800)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cifar", required=True, help="the untarred test/ folder: test/<class>/NNNN.jpg")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    cifar, out = Path(args.cifar).resolve(), Path(args.out)
    for name in ID_CLASSES + OOD_CLASSES:
        if not (cifar / name / "0799.jpg").is_file():
            raise SystemExit(f"cifar_split: {cifar / name / '0799.jpg'} is missing: untar cifar10_test_jpg.tar")
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        with open(out / f"{split}.jsonl", "w") as rows:
            for name in ID_CLASSES:
                for index in SPLITS[split]:
                    captions = [template.format(name) for template in TEMPLATES]
                    rows.write(json.dumps({"key": f"{name}_{index:04d}", "path": str(cifar / name / f"{index:04d}.jpg"),
                                           "captions": captions}) + "\n")
    for folder, classes in (("id_test", ID_CLASSES), ("ood_test", OOD_CLASSES)):
        for name in classes:
            for index in SPLITS["test"]:
                link = out / folder / f"{name}_{index:04d}.jpg"
                link.parent.mkdir(parents=True, exist_ok=True)
                if not link.exists():
                    os.symlink(cifar / name / f"{index:04d}.jpg", link)
    (out / "id_classes.txt").write_text("\n".join(ID_CLASSES) + "\n")
    print(f"{out}: train.jsonl, val.jsonl, id_test/ and ood_test/ ({len(SPLITS['test']) * 5} images each)")


if __name__ == "__main__":
    main()
