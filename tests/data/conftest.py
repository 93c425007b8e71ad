"""Fixtures for the data tests: real media encoded on the fly (PyAV, PIL) and tar shards built from them."""

from __future__ import annotations

import io
import struct
import tarfile
import zlib
from pathlib import Path
from types import SimpleNamespace

import av
import numpy as np
import open_clip
import pytest
from PIL import Image

from mmsphere.data.h264 import x264_options
from mmsphere.data.stats import reset_skipped_counts

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def frame_pattern(index: int, height: int, width: int) -> np.ndarray:
    """A frame whose content identifies its index: a flat grey level that steps by 6 per frame, plus a bar."""
    frame = np.full((height, width, 3), 20 + (6 * index) % 220, dtype=np.uint8)
    frame[: max(1, height // 4), : max(1, width // 3)] = (200, 40, 40)
    return frame


def encode_video(
    *,
    width: int = 32,
    height: int = 32,
    frames: int = 12,
    codec: str = "libx264",
    container_format: str = "mp4",
    pix_fmt: str = "yuv420p",
    fps: int = 10,
    audio: bool = False,
    video: bool = True,
    gop: int | None = None,
) -> bytes:
    """Real encoded video bytes (H.264/MP4 by default) whose frames follow :func:`frame_pattern`."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container_format) as container:
        if video:
            stream = container.add_stream(codec, rate=fps)
            stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
            if codec == "libx264":
                stream.options = x264_options(crf=10, gop=gop)
            elif gop is not None:
                stream.options = {"g": str(gop), "keyint_min": str(gop), "sc_threshold": "0"}
        if audio:
            audio_stream = container.add_stream("aac" if container_format == "mp4" else "libopus", rate=48000)
        for index in range(frames if video else 0):
            frame = av.VideoFrame.from_ndarray(frame_pattern(index, height, width), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        if audio:
            for chunk in range(20):
                samples = np.sin(np.arange(960) * 0.05 * (chunk + 1)).astype(np.float32)[None] * 0.1
                audio_frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
                audio_frame.sample_rate, audio_frame.pts = 48000, chunk * 960
                for packet in audio_stream.encode(audio_frame):
                    container.mux(packet)
            for packet in audio_stream.encode():
                container.mux(packet)
        if video:
            for packet in stream.encode():
                container.mux(packet)
    return buffer.getvalue()


def encode_image(width: int = 40, height: int = 30, image_format: str = "PNG", seed: int = 0) -> bytes:
    """A real image file (smooth random colours) in ``image_format``."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(1, height // 5), max(1, width // 5), 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((width, height), Image.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return buffer.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar shard holding ``members`` (name, bytes) in this order."""
    with tarfile.open(path, "w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def png_bomb(side: int) -> bytes:
    """A valid greyscale PNG of side x side pixels that compresses ~1000:1 (a decompression bomb)."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    compressor = zlib.compressobj(9)
    row = bytes(side + 1)  # filter byte 0 + zero pixels
    body = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


@pytest.fixture(scope="session")
def media() -> SimpleNamespace:
    """The factories of this file: ``video``, ``image``, ``tar``, ``png_bomb``, ``pattern``; CLIP ``mean``/``std``."""
    return SimpleNamespace(
        video=encode_video, image=encode_image, tar=write_tar, png_bomb=png_bomb, pattern=frame_pattern,
        mean=MEAN, std=STD,
    )


@pytest.fixture(scope="session")
def tokenizer():
    """open_clip's BPE tokenizer (bundled vocabulary, offline) with a short context."""
    return open_clip.get_tokenizer("ViT-B-32", context_length=16)


@pytest.fixture(scope="session")
def clip_bytes() -> bytes:
    """A 12-frame 32x32 H.264 clip with an audio stream."""
    return encode_video(frames=12, audio=True)


@pytest.fixture(autouse=True)
def _fresh_skip_counts():
    reset_skipped_counts()
    yield
    reset_skipped_counts()
