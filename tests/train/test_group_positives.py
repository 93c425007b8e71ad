"""``loss.positives: group`` end to end: group ids from the shards' JSON through the pipeline into the objective."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from mmsphere.config import config_from_dict
from mmsphere.config import MmsphereError
from mmsphere.data.samples import read_group
from mmsphere.train import train

from .conftest import tiny_config

CLASSES = ("red", "green", "blue")


def write_class_prompt_shards(directory, shards: int, per_shard: int, with_groups: bool = True) -> str:
    """Images of three colours captioned by a class prompt, the class as the group (FLYP/CMA style)."""
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
    for shard in range(shards):
        with wds.TarWriter(str(directory / f"cls-{shard:06d}.tar")) as writer:
            for index in range(per_shard):
                name = CLASSES[rng.integers(len(CLASSES))]
                pixels = rng.integers(0, 40, (32, 32, 3)).astype(np.uint8)
                pixels[8:24, 8:24] = colours[name]
                buffer = io.BytesIO()
                Image.fromarray(pixels).save(buffer, format="JPEG")
                payload = {"captions": [f"a photo of {name}"], **({"group": name} if with_groups else {})}
                writer.write({"__key__": f"cls{shard:03d}_{index:04d}", "jpg": buffer.getvalue(),
                              "json": json.dumps(payload).encode()})
    return str(directory / f"cls-{{000000..{shards - 1:06d}}}.tar")


def test_group_comes_from_the_json_else_the_key():
    assert read_group({"json": b'{"captions": ["a"], "group": "cat"}'}, "k1") == "cat"
    assert read_group({"json": b'{"captions": ["a"], "group": 7}'}, "k1") == "7"
    assert read_group({"json": b'{"captions": ["a"]}'}, "k1") == "k1"
    assert read_group({"txt": b"a caption"}, "k2") == "k2"


def test_group_positives_train_from_shards(tmp_path):
    urls = write_class_prompt_shards(tmp_path / "shards", shards=2, per_shard=16)
    raw = tiny_config({"train": urls, "meta": urls}, tmp_path / "run", loss={"terms": {"clip": 1.0},
                                                                          "positives": "group"},
                      meta={"enabled": True, "params": "heads", "hidden": 8, "weights_log_every": 1})
    summary = train(config_from_dict(raw))
    assert summary["steps"] == 4 and summary["nonfinite_steps_skipped"] == 0


def test_group_positives_without_groups_in_the_data_name_the_source(tmp_path):
    urls = write_class_prompt_shards(tmp_path / "shards", shards=2, per_shard=16, with_groups=False)
    raw = tiny_config({"train": urls, "meta": urls}, tmp_path / "run", loss={"terms": {"clip": 1.0},
                                                                          "positives": "group"})
    raw["data"]["train"][0]["name"] = "prompts"
    with pytest.raises(MmsphereError, match="samples of data source 'prompts' carry no group ids"):
        train(config_from_dict(raw))


def test_the_loop_passes_group_ids_to_the_objective(tmp_path, monkeypatch):
    """Same-class pairs in a batch are positives: the objective gets the ids of the batch's classes."""
    from mmsphere.losses import objective as objective_module

    seen = []
    original = objective_module.Objective.evaluate

    def recording(self, *args, group_ids=None, **kwargs):
        seen.append(group_ids)
        return original(self, *args, group_ids=group_ids, **kwargs)

    monkeypatch.setattr(objective_module.Objective, "evaluate", recording)
    urls = write_class_prompt_shards(tmp_path / "shards", shards=2, per_shard=16)
    raw = tiny_config({"train": urls, "meta": urls}, tmp_path / "run", loss={"terms": {"clip": 1.0},
                                                                          "positives": "group"},
                      train={"max_steps": 1})
    train(config_from_dict(raw))
    ids = seen[0]
    assert isinstance(ids, torch.Tensor) and ids.shape == (8,)
    assert len(set(ids.tolist())) in range(2, len(CLASSES) + 1)  # several samples per class share an id
