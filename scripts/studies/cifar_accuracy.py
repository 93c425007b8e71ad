"""Zero-shot ID classification accuracy of the OoD study's runs (REPORT.md §3): did the heads learn the ID classes?

Classifies held-out ID test images (the first ``--per-class`` of each ID class in ``id_test/``) among
the five ID class names with the same prompt as the OoD scores ("a photo of a {}."); writes
``id_accuracy.json`` into every run folder. The untrained model is rebuilt from the study's config.

    python scripts/studies/cifar_accuracy.py --study runs/study/cifar --per-class 50
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch

from mmsphere.train.config import load_config
from mmsphere.models import create_model, load_run
from mmsphere.ood.evaluate import encode_image_set, prompt_features
from mmsphere.ood.inputs import DEFAULT_TEMPLATES


@torch.inference_mode()
def accuracy(model: torch.nn.Module, images: Path, classes: list[str]) -> float:
    """Top-1 accuracy (%) of the prompt classifier on a folder of ``<class>_NNNN.jpg`` images."""
    model.eval()
    class_features = prompt_features(model, classes, list(DEFAULT_TEMPLATES))
    features, names, _, _ = encode_image_set(model, str(images), 50, 0, "id")
    predicted = (features @ class_features.T).argmax(dim=1).tolist()
    truth = [classes.index(Path(name).name.rsplit("_", 1)[0]) for name in names]
    return 100.0 * sum(p == t for p, t in zip(predicted, truth)) / len(truth)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", default="runs/study/cifar")
    parser.add_argument("--per-class", type=int, default=50)
    args = parser.parse_args()
    study = Path(args.study)
    classes = (study / "id_classes.txt").read_text().split()
    with tempfile.TemporaryDirectory() as folder:
        for name in classes:
            for path in sorted((study / "id_test").glob(f"{name}_*.jpg"))[: args.per_class]:
                os.symlink(path.resolve(), Path(folder) / path.name)
        zero_shot = accuracy(create_model(load_config("configs/studies/cifar_ood.yaml").model), Path(folder), classes)
        print(f"zero-shot: {zero_shot:.1f}%")
        for run in sorted(study.glob("*/*/seed_*")):  # every study of the split
            if run.parent.is_symlink():
                continue  # a variant another study linked in: scored where it lives
            done = run / "id_accuracy.json"
            if done.is_file() and json.loads(done.read_text())["images"] == len(classes) * args.per_class:
                print(f"{run}: {json.loads(done.read_text())['id_accuracy']:.1f}% (scored before)")
                continue
            if (run / "model.safetensors").is_file():
                value = accuracy(load_run(run), Path(folder), classes)
            elif run.parent.name == "zero-shot":
                value = zero_shot  # the pretrained model, identical for every seed
            else:
                continue
            (run / "id_accuracy.json").write_text(json.dumps({"id_accuracy": value, "images": len(classes) * args.per_class}) + "\n")
            print(f"{run}: {value:.1f}%")


if __name__ == "__main__":
    main()
