"""Tiny image-text shards and a tiny-model config for the training tests."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
SHAPES = ("square", "stripe")


def write_image_text_shards(directory: Path, prefix: str, shards: int, per_shard: int, seed: int,
                            groups: bool = False) -> str:
    """Real JPEG image-text pairs ("a red square") in ``shards`` tars; returns the brace URL pattern.

    ``groups``: the caption goes into a ``.json`` with the colour as the sample's group (``loss.positives: group``).
    """
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    for shard in range(shards):
        with wds.TarWriter(str(directory / f"{prefix}-{shard:06d}.tar")) as writer:
            for index in range(per_shard):
                colour, shape = names[rng.integers(len(names))], SHAPES[rng.integers(len(SHAPES))]
                pixels = rng.integers(0, 40, (32, 32, 3)).astype(np.uint8)
                if shape == "square":
                    pixels[8:24, 8:24] = COLOURS[colour]
                else:
                    pixels[:, 12:20] = COLOURS[colour]
                buffer = io.BytesIO()
                Image.fromarray(pixels).save(buffer, format="JPEG")
                caption = f"a {colour} {shape}"
                text = ({"json": json.dumps({"captions": [caption], "group": colour}).encode()} if groups
                        else {"txt": caption})
                writer.write({"__key__": f"{prefix}{shard:03d}_{index:04d}", "jpg": buffer.getvalue(), **text})
    return str(directory / f"{prefix}-{{000000..{shards - 1:06d}}}.tar")


@pytest.fixture(scope="session")
def image_text_shards(tmp_path_factory) -> dict[str, str]:
    """URL patterns of a train set (4 shards) and a clean meta set (2 shards)."""
    root = tmp_path_factory.mktemp("shards")
    return {"train": write_image_text_shards(root, "train", shards=4, per_shard=24, seed=0),
            "meta": write_image_text_shards(root, "meta", shards=2, per_shard=16, seed=1)}


def tiny_config(shards: dict[str, str], output_dir: Path, **sections) -> dict:
    """A raw config dict for a seconds-long CPU run of the tiny model on the shards above."""
    raw = {
        "output_dir": str(output_dir),
        "seed": 0,
        "model": {"name": "mmsphere-tiny"},
        "data": {"train": [{"urls": shards["train"], "modality": "image"}],
                 "meta": {"urls": shards["meta"], "modality": "image"},
                 "shuffle_buffer": 16, "epoch_samples": 48, "workers": 0},
        "loss": {"terms": {"angular_margin": {"weight": 1.0, "margin": 0.1}}},
        "meta": {"enabled": False},
        "train": {"max_steps": 4, "batch_size": 8, "lr": 1e-3, "warmup_steps": 1, "checkpoint_every": 2,
                  "log_every": 1, "cpu": True},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            raw.setdefault(section, {}).update(values)
        else:
            raw[section] = values
    return raw
