"""A tiny saved run, tiny videos, their shards and an MSR-VTT style list of them."""

from __future__ import annotations

import csv
from pathlib import Path

import av
import numpy as np
import pytest

from mmsphere.data.shards import ListEntry, write_shards

CAPTIONS = {
    "video0": ["a red square", "something red"],
    "video1": ["a green field"],
    "video2": ["blue water", "the sea", "a blue screen"],
    "video3": ["a dark room"],
    "video4": ["a bright light", "white"],
    "video5": ["stripes moving"],
}


def write_video(path: Path, seed: int, frames: int = 6, height: int = 36, width: int = 44) -> None:
    """A short mpeg4 clip of seeded coloured noise (not a multiple of the model's 32 px, so it is resized)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=3)
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for index in range(frames):
            noise = rng.integers(-40, 40, size=(height, width, 3))
            pixels = np.clip(base + noise + 10 * index, 0, 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture(scope="session")
def media(tmp_path_factory) -> Path:
    """``video0.mp4`` ... ``video5.mp4`` in one folder."""
    folder = tmp_path_factory.mktemp("media")
    for index, key in enumerate(CAPTIONS):
        write_video(folder / f"{key}.mp4", seed=index)
    return folder


@pytest.fixture(scope="session")
def video_shards(media, tmp_path_factory) -> str:
    """The videos and their captions as webdataset shards (2 shards), via the project's shard writer."""
    entries = [ListEntry(key, media / f"{key}.mp4", captions) for key, captions in CAPTIONS.items()]
    summary = write_shards(entries, tmp_path_factory.mktemp("shards") / "val", maxcount=4, progress=False)
    assert not summary.skipped
    return summary.url_pattern()


@pytest.fixture(scope="session")
def msrvtt_csv(media, tmp_path_factory) -> Path:
    """The same videos and captions as an MSR-VTT 1k-A style CSV (one row per caption)."""
    path = tmp_path_factory.mktemp("lists") / "MSRVTT_JSFUSION_test.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["key", "vid_key", "video_id", "sentence"])
        row = 0
        for key, captions in CAPTIONS.items():
            for caption in captions:
                writer.writerow([f"ret{row}", key.replace("video", "msr"), key, caption])
                row += 1
    return path
