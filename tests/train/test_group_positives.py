"""``loss.positives: group`` end to end: group ids from the shards' JSON through the pipeline into the objective.

The training tests know each sample's class from the shards they wrote and check what the objective
computed on the batch against a loop transcription of the grouped loss on those classes, so a loop,
step or objective that dropped the ids (or made every sample its own group) fails them.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from mmsphere.errors import MmsphereError
from mmsphere.train.config import config_from_dict
from mmsphere.data.samples import read_group
from mmsphere.losses import objective as objective_module
from mmsphere.train import loop, train
from tests.losses.test_functional import loop_clip, loop_multi_positive_ce

from .conftest import tiny_config

CLASSES = ("red", "green", "blue")


def write_class_prompt_shards(directory, shards: int, per_shard: int, with_groups: bool = True, prefix: str = "cls",
                              seed: int = 0) -> tuple[str, dict[str, str]]:
    """Images of three colours captioned by a class prompt, the class as the group (FLYP/CMA style).

    Returns the URL pattern and each sample's class by key.
    """
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
    classes = {}
    for shard in range(shards):
        with wds.TarWriter(str(directory / f"{prefix}-{shard:06d}.tar")) as writer:
            for index in range(per_shard):
                name = CLASSES[rng.integers(len(CLASSES))]
                pixels = rng.integers(0, 40, (32, 32, 3)).astype(np.uint8)
                pixels[8:24, 8:24] = colours[name]
                buffer = io.BytesIO()
                Image.fromarray(pixels).save(buffer, format="JPEG")
                payload = {"captions": [f"a photo of {name}"], **({"group": name} if with_groups else {})}
                key = f"{prefix}{shard:03d}_{index:04d}"
                classes[key] = name
                writer.write({"__key__": key, "jpg": buffer.getvalue(), "json": json.dumps(payload).encode()})
    return str(directory / f"{prefix}-{{000000..{shards - 1:06d}}}.tar"), classes


def test_group_comes_from_the_json_else_the_key():
    assert read_group({"json": b'{"captions": ["a"], "group": "cat"}'}, "k1") == "cat"
    assert read_group({"json": b'{"captions": ["a"], "group": 7}'}, "k1") == "7"
    assert read_group({"json": b'{"captions": ["a"]}'}, "k1") == "k1"
    assert read_group({"txt": b"a caption"}, "k2") == "k2"


def _record_batches_and_objective_calls(monkeypatch) -> tuple[list, list]:
    """Spies: every batch the loop hands to a step (train, then meta), and every objective evaluation (inputs and result)."""
    batches, calls = [], []
    optimization_step = loop.optimization_step

    def recording_step(task, batch, optimizer, meta_batch=None, **keywords):
        for seen in (batch, meta_batch) if meta_batch is not None else (batch,):
            batches.append((seen.source, list(seen.keys)))
        return optimization_step(task, batch, optimizer, meta_batch=meta_batch, **keywords)

    evaluate = objective_module.Objective.evaluate

    def recording_evaluate(self, image_features, text_features, logit_scale, *, group_ids=None, **kwargs):
        result = evaluate(self, image_features, text_features, logit_scale, group_ids=group_ids, **kwargs)
        calls.append({"batches_so_far": len(batches), "group_ids": group_ids, "image": image_features.detach(),
                      "text": text_features.detach(), "scale": float(logit_scale.detach()),
                      "per_sample": result.per_sample.detach()})
        return result

    monkeypatch.setattr(loop, "optimization_step", recording_step)
    monkeypatch.setattr(objective_module.Objective, "evaluate", recording_evaluate)
    return batches, calls


def _same_group(labels) -> list[list[bool]]:
    return [[a == b for b in labels] for a in labels]


def test_the_training_objective_takes_the_batch_classes_as_positives(tmp_path, monkeypatch):
    """Each step's per-sample CLIP losses are UniCL's on the batch's classes, and so is the logged loss."""
    urls, classes = write_class_prompt_shards(tmp_path / "shards", shards=2, per_shard=16)
    batches, calls = _record_batches_and_objective_calls(monkeypatch)
    raw = tiny_config({"train": urls, "meta": urls}, tmp_path / "run",
                      loss={"terms": {"clip": 1.0}, "positives": "group"}, train={"max_steps": 3})
    summary = train(config_from_dict(raw))
    assert summary["steps"] == 3 and summary["nonfinite_steps_skipped"] == 0
    assert len(calls) == len(batches) == 3  # one batch and one evaluation per step
    logged = [json.loads(line)["loss/clip"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for (_, keys), call, logged_loss in zip(batches, calls, logged):
        labels = [CLASSES.index(classes[key]) for key in keys]
        assert len(set(labels)) < len(labels)  # with 3 classes, a batch of 8 shares some
        image, text = call["image"].double().tolist(), call["text"].double().tolist()
        logits = [[call["scale"] * sum(x * y for x, y in zip(a, b)) for b in text] for a in image]
        expected = loop_multi_positive_ce(logits, labels)
        per_sample = call["per_sample"].double()
        torch.testing.assert_close(per_sample, torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-5)
        # the diagonal loss is another value on these features: the test tells the two apart
        diagonal = torch.tensor(loop_clip(image, text, call["scale"]), dtype=torch.float64)
        assert (per_sample - diagonal).abs().max() > 1e-3
        assert logged_loss == pytest.approx(sum(expected) / len(expected), rel=1e-5)


def test_the_meta_step_takes_each_batch_classes_as_positives(tmp_path, monkeypatch):
    """With meta weighting, every evaluation (virtual step on the train batch, meta loss on the meta batch, the
    step itself) gets ids that group its own batch's samples by class."""
    urls, classes = write_class_prompt_shards(tmp_path / "shards", shards=2, per_shard=16)
    meta_urls, meta_classes = write_class_prompt_shards(tmp_path / "shards", shards=1, per_shard=16, prefix="meta",
                                                        seed=1)
    batches, calls = _record_batches_and_objective_calls(monkeypatch)
    raw = tiny_config({"train": urls, "meta": meta_urls}, tmp_path / "run",
                      loss={"terms": {"clip": 1.0}, "positives": "group"},
                      meta={"enabled": True, "params": "heads", "hidden": 8, "weights_log_every": 1},
                      train={"max_steps": 2})
    raw["data"]["meta"]["name"] = "meta"
    summary = train(config_from_dict(raw))
    assert summary["steps"] == 2 and summary["nonfinite_steps_skipped"] == 0
    labels = {**classes, **meta_classes}
    used = set()
    for call in calls:
        latest = {}
        for index, (source, keys) in enumerate(batches[:call["batches_so_far"]]):
            latest[source] = (index, keys)  # the step's train and meta batches are the latest of each source
        assert call["group_ids"] is not None
        ids = _same_group(call["group_ids"].tolist())
        matching = [index for index, keys in latest.values() if ids == _same_group([labels[key] for key in keys])]
        assert matching, f"group ids {call['group_ids'].tolist()} group no batch of the step by class"
        used.update(matching)
    meta_batches = {index for index, (source, _) in enumerate(batches) if source == "meta"}
    assert meta_batches and meta_batches <= used  # the meta loss saw its batch's groups too
    assert len(used) == len(batches)


def test_group_positives_without_groups_in_the_data_name_the_source(tmp_path):
    urls, _ = write_class_prompt_shards(tmp_path / "shards", shards=2, per_shard=16, with_groups=False)
    raw = tiny_config({"train": urls, "meta": urls}, tmp_path / "run", loss={"terms": {"clip": 1.0},
                                                                          "positives": "group"})
    raw["data"]["train"][0]["name"] = "prompts"
    with pytest.raises(MmsphereError, match="samples of data source 'prompts' carry no group ids"):
        train(config_from_dict(raw))
