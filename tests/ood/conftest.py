"""A tiny saved run and tiny image sets: class folders (ID), a flat folder and image shards (OoD)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmsphere.data.shards import ListEntry, write_shards

ID_CLASSES = {"red": (220, 30, 30), "green": (30, 200, 40)}
OOD_COLOURS = [(20, 20, 20), (240, 240, 240), (120, 60, 200), (200, 200, 0), (0, 150, 220)]


def write_image(path: Path, colour: tuple[int, int, int], seed: int) -> None:
    """A noisy image of one colour, 40 x 48 px so that preprocessing resizes and crops it."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour) + rng.integers(-30, 30, size=(40, 48, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.fixture(scope="session")
def image_sets(tmp_path_factory) -> dict[str, str]:
    """``id``: DIR/<class>/*.png (4 per class), ``flat``: DIR/*.png, ``shards``: image shards (OoD)."""
    root = tmp_path_factory.mktemp("images")
    for name, colour in ID_CLASSES.items():
        (root / "id" / name).mkdir(parents=True)
        for index in range(4):
            write_image(root / "id" / name / f"{index}.png", colour, seed=index)
    (root / "flat").mkdir()
    for index, colour in enumerate(OOD_COLOURS):
        write_image(root / "flat" / f"{index}.jpg", colour, seed=10 + index)
    (root / "for_shards").mkdir()
    entries = []
    for index, colour in enumerate(OOD_COLOURS[:3]):
        path = root / "for_shards" / f"{index}.png"
        write_image(path, colour, seed=20 + index)
        entries.append(ListEntry(f"ood{index}", path, ["an image"]))
    urls = write_shards(entries, root / "shards", progress=False).url_pattern()
    classes = root / "classes.txt"
    classes.write_text("\n".join(ID_CLASSES) + "\n")
    return {"id": str(root / "id"), "flat": str(root / "flat"), "shards": urls, "classes": str(classes),
            "root": str(root)}
