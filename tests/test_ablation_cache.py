"""The ablation tool on a feature cache: its ID accuracy and OoD AUROC equal an uncached, independent computation."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
from sklearn.metrics import roc_auc_score

from mmsphere.ablation import OodSets, run_ablation
from mmsphere.train.config import config_from_dict
from mmsphere.data import build_eval_loader
from mmsphere.models import load_run
from tests.test_ablation import COLOURS, colour_image, write_shards

ID_CLASSES, OOD_CLASSES = ("red", "green"), ("blue", "yellow")
TEMPLATES = ["a {} square", "a photo of a {} square"]


def write_class_shards(directory: Path, classes: tuple[str, ...], per_class: int, seed: int) -> str:
    """Image shards whose samples carry their colour as ``group`` (the class the ID accuracy reads)."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(directory / "set-000000.tar")) as writer:
        for index in range(per_class * len(classes)):
            colour = classes[index % len(classes)]
            buffer = io.BytesIO()
            colour_image(colour, rng).save(buffer, format="JPEG")
            writer.write({"__key__": f"{directory.name}{index:03d}", "jpg": buffer.getvalue(),
                          "json": {"captions": [f"a {colour} square"], "group": colour}})
    return str(directory / "set-000000.tar")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_cached_ablation_scores_equal_an_uncached_computation(tmp_path):
    """ID accuracy, MCM AUROC and retrieval of a cached ablation run match features decoded and encoded anew."""
    assert set(ID_CLASSES + OOD_CLASSES) == set(COLOURS)
    train = write_shards(tmp_path / "train", "train", 32, seed=0)[0]
    val = write_shards(tmp_path / "val", "val", 12, seed=2)[0]
    id_set = write_class_shards(tmp_path / "id", ID_CLASSES, 6, seed=3)
    ood_set = write_class_shards(tmp_path / "ood", OOD_CLASSES, 6, seed=4)
    raw = {"seed": 0, "model": {"name": "mmsphere-tiny", "trainable": "heads"},
           "data": {"train": [{"urls": train, "modality": "image"}], "val": {"urls": val, "modality": "image"},
                    "shuffle_buffer": 8, "epoch_samples": 32, "feature_cache": True},
           "train": {"max_steps": 6, "batch_size": 8, "lr": 1e-2, "warmup_steps": 1, "checkpoint_every": 6,
                     "log_every": 1, "cpu": True}}
    ood = OodSets(id_images=id_set, ood_images={"colours": ood_set}, classes=list(ID_CLASSES), templates=TEMPLATES,
                  scores=("mcm", "neglabel"), negative_labels=["tree", "house", "car"])
    results = run_ablation(config_from_dict(raw), ["margin"], [0], tmp_path / "out", ood=ood, eval_batch_size=5)
    metrics = results["runs"][0]["metrics"]
    assert list((tmp_path / "id" / "features").iterdir()), "the OoD sets were not read from a feature cache"

    model = load_run(results["runs"][0]["run_dir"]).eval()
    with torch.inference_mode():
        def encoded(spec: str) -> tuple[torch.Tensor, list[str]]:
            loader = build_eval_loader(spec, "image", frames=1, image_size=model.image_size, image_mean=model.image_mean,
                                       image_std=model.image_std, batch_size=7)
            batches = list(loader)
            return (torch.cat([model.encode_image(batch.media) for batch in batches]),
                    [group for batch in batches for group in batch.groups])

        id_features, id_labels = encoded(id_set)
        ood_features, _ = encoded(ood_set)
        prompts = [F.normalize(model.encode_text(model.tokenizer([t.format(name) for t in TEMPLATES])), dim=-1).mean(0)
                   for name in ID_CLASSES]
        classes = F.normalize(torch.stack(prompts), dim=-1)
    predicted = [ID_CLASSES[index] for index in (id_features @ classes.T).argmax(dim=1).tolist()]
    accuracy = np.mean([guess == label for guess, label in zip(predicted, id_labels)])
    assert metrics["ood/id_accuracy"] == pytest.approx(accuracy)
    mcm = [torch.softmax(features @ classes.T, dim=1).max(dim=1).values for features in (id_features, ood_features)]
    truth = [1] * len(mcm[0]) + [0] * len(mcm[1])
    assert metrics["ood/mcm/colours/AUROC"] == pytest.approx(roc_auc_score(truth, torch.cat(mcm).numpy()), abs=1e-6)
    assert 0.0 <= metrics["ood/neglabel/colours/AUROC"] <= 1.0
    assert "t2v/R@1" in metrics and "ood/mcm/mean/AUROC" in metrics
