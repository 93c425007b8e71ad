"""Decoding media bytes: video with decord (PyAV fallback, PyAV keyframe seeking in fast mode), images with PIL.

Everything works on in-memory bytes from a tar member; nothing touches the disk. Failures raise
:class:`DecodeError` carrying a skip reason of :data:`mmsphere.data.stats.SKIP_REASONS`, so the
pipeline can count them and move on.
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass

import av
import decord
import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from mmsphere.data.transforms import sample_frame_indices

logger = logging.getLogger(__name__)

# decord's bundled FFmpeg would otherwise print a line per damaged packet, bypassing our rate limit
decord.logging.set_level(decord.logging.QUIET)

DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
# Only formats a dataset image can sensibly be; keeps PIL away from plugins that shell out (EPS).
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")


class DecodeError(Exception):
    """A sample cannot be decoded; ``reason`` is a key of ``SKIP_REASONS``."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class VideoClip:
    """Decoded frames of one clip and where they come from."""

    frames: np.ndarray  # [k, H, W, 3] uint8, k <= the requested number of frames
    indices: list[int]  # frame index (presentation order) of each row of ``frames``
    num_frames: int  # frames in the whole clip
    backend: str  # "decord", "pyav" (exact fallback) or "pyav-keyframes" (fast mode)


def decode_video(
    data: bytes,
    frames: int,
    *,
    fast: bool = False,
    random_offset: bool = False,
    rng: np.random.Generator | None = None,
) -> VideoClip:
    """Decode ``frames`` frames of a video held in memory.

    Exact mode (evaluation, and training by default) returns the frames at
    :func:`~mmsphere.data.transforms.sample_frame_indices` decoded by decord's ``get_batch``, or
    by PyAV when decord cannot open or decode the file. Fast mode returns, for each of those
    indices, the keyframe nearest to it, decoding nothing but keyframes; a clip with no more than
    ``frames`` frames is decoded exactly, as every frame of it is needed anyway.
    """
    if frames < 1:
        raise ValueError(f"frames={frames} must be >= 1")
    if not data:
        raise DecodeError("empty_media", "zero-byte video")
    # Probing with PyAV first keeps garbage and audio-only files away from decord, whose C++
    # logger prints to stderr on every failed open.
    container = _open_container(data)
    try:
        if not container.streams.video:
            kinds = ", ".join(stream.type for stream in container.streams) or "none"
            raise DecodeError("no_video_stream", f"streams: {kinds}")
        if fast:
            clip = _decode_nearest_keyframes(container, frames, random_offset, rng)
            if clip is not None:
                return clip
    finally:
        container.close()
    try:
        return _decode_with_decord(data, frames, random_offset, rng)
    except Exception as error:  # decord raises its own DECORDError and RuntimeError alike
        logger.debug("decord failed (%s); decoding with PyAV", error)
    return _decode_with_pyav(data, frames, random_offset, rng)


def decode_image(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, draft_size: int | None = None
) -> np.ndarray:
    """Decode an image to ``[H, W, 3] uint8`` RGB, refusing more than ``max_pixels`` pixels before decoding.

    ``draft_size`` (training's fast mode): let the JPEG decoder scale by 1/2, 1/4 or 1/8 in the DCT
    domain while both sides stay >= ``draft_size``, which is several times faster on photos much
    larger than the model input; other formats decode in full.
    """
    if not data:
        raise DecodeError("empty_media", "zero-byte image")
    try:
        with warnings.catch_warnings():
            # PIL warns on odd palettes and on large images; both are handled here explicitly
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
            width, height = image.size
            if width * height > max_pixels:
                raise DecodeError("image_too_large", f"{width}x{height} = {width * height} pixels > {max_pixels}")
            if image.format == "JPEG":
                if draft_size is not None and min(width, height) >= 2 * draft_size:
                    image.draft("RGB", (draft_size, draft_size))  # DCT-domain scaling: PIL's decoder has it
                else:
                    return _decode_jpeg(data)
            if image.mode != "RGB":
                image = image.convert("RGB")
            return np.array(image)
    except DecodeError:
        raise
    except Image.DecompressionBombError as error:
        raise DecodeError("image_too_large", str(error)) from None
    except Exception as error:  # PIL raises UnidentifiedImageError, OSError, ValueError, SyntaxError...
        raise DecodeError("image_decode_error", f"{type(error).__name__}: {error}") from None


def _decode_jpeg(data: bytes) -> np.ndarray:
    """A JPEG through torchvision's libjpeg-turbo: PIL's pixels bit for bit (grey and CMYK converted as PIL
    does; tests/data/test_decode.py), in well under half of PIL's time (BENCHMARKS.md).

    The decoder writes ``[H, W, 3]`` and hands out a ``[3, H, W]`` view; permuting back is free.
    """
    try:
        # the decoder only reads its input: the non-writable-buffer warning does not apply
        planes = decode_jpeg(torch.frombuffer(data, dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError as error:
        raise DecodeError("image_decode_error", f"JPEG: {str(error).splitlines()[-1]}") from None
    return planes.permute(1, 2, 0).numpy()


def _open_container(data: bytes) -> av.container.InputContainer:
    try:
        return av.open(io.BytesIO(data), mode="r")
    except Exception as error:
        raise DecodeError("video_decode_error", f"{type(error).__name__}: {error}") from None


def _decode_with_decord(
    data: bytes, frames: int, random_offset: bool, rng: np.random.Generator | None
) -> VideoClip:
    reader = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0))
    num_frames = len(reader)
    indices = sample_frame_indices(num_frames, frames, random_offset=random_offset, rng=rng)
    batch = reader.get_batch(indices)
    array = batch.asnumpy() if hasattr(batch, "asnumpy") else np.asarray(batch)
    # decord has returned 4-channel garbage for some small frame widths; never trust its shape
    if array.ndim != 4 or array.shape[0] != len(indices) or array.shape[-1] != 3 or array.dtype != np.uint8:
        raise RuntimeError(f"decord returned {array.dtype} {array.shape} for {len(indices)} frames")
    return VideoClip(array, indices, num_frames, "decord")


def _decode_with_pyav(
    data: bytes, frames: int, random_offset: bool, rng: np.random.Generator | None
) -> VideoClip:
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            stream = container.streams.video[0]
            counted = sum(1 for packet in container.demux(stream) if packet.size > 0)
        if counted == 0:
            raise DecodeError("video_decode_error", "the video stream holds no frames")
        indices = sample_frame_indices(counted, frames, random_offset=random_offset, rng=rng)
        decoded, seen = _decode_indices(data, set(indices))
        num_frames = counted
        if len(decoded) < len(set(indices)) and seen > 0:
            # fewer frames came out than packets went in (damaged tail): sample from what exists
            num_frames = seen
            indices = sample_frame_indices(seen, frames, random_offset=random_offset, rng=rng)
            decoded, _ = _decode_indices(data, set(indices))
        if len(decoded) < len(set(indices)):
            raise DecodeError("video_decode_error", f"PyAV decoded {seen} of {counted} frames")
        return VideoClip(np.stack([decoded[index] for index in indices]), indices, num_frames, "pyav")
    except DecodeError:
        raise
    except Exception as error:
        raise DecodeError("video_decode_error", f"{type(error).__name__}: {error}") from None


def _decode_indices(data: bytes, wanted: set[int]) -> tuple[dict[int, np.ndarray], int]:
    """Decode frames in presentation order, keeping those in ``wanted``; returns them and the count seen."""
    decoded: dict[int, np.ndarray] = {}
    last = max(wanted)
    seen = 0
    with av.open(io.BytesIO(data), mode="r") as container:
        try:
            for index, frame in enumerate(container.decode(video=0)):
                seen = index + 1
                if index in wanted:
                    decoded[index] = frame.to_ndarray(format="rgb24")
                if index >= last:
                    break
        except av.FFmpegError as error:
            logger.debug("PyAV stopped after %d frames: %s", seen, error)
    return decoded, seen


def _decode_nearest_keyframes(
    container: av.container.InputContainer,
    frames: int,
    random_offset: bool,
    rng: np.random.Generator | None,
) -> VideoClip | None:
    """Fast mode: the keyframe nearest each sampled index, decoding keyframe packets only.

    Returns None where exact decoding should be used instead (short clip, no usable timestamps).
    """
    stream = container.streams.video[0]
    timestamps: list[int] = []
    keyframe_packets: dict[int, av.Packet] = {}
    try:
        for packet in container.demux(stream):
            if packet.size == 0:
                continue
            if packet.pts is None:
                return None
            timestamps.append(packet.pts)
            if packet.is_keyframe:
                keyframe_packets[packet.pts] = packet
    except av.FFmpegError as error:
        raise DecodeError("video_decode_error", f"{type(error).__name__}: {error}") from None
    num_frames = len(timestamps)
    if num_frames <= frames or not keyframe_packets:
        return None
    presentation = sorted(timestamps)
    if len(set(presentation)) != num_frames:
        return None
    position = {pts: index for index, pts in enumerate(presentation)}
    keyframe_indices = np.array(sorted(position[pts] for pts in keyframe_packets))
    targets = sample_frame_indices(num_frames, frames, random_offset=random_offset, rng=rng)
    chosen = [int(keyframe_indices[np.abs(keyframe_indices - target).argmin()]) for target in targets]

    context = stream.codec_context
    decoded: dict[int, np.ndarray] = {}
    for index in dict.fromkeys(chosen):
        pts = presentation[index]
        try:
            context.flush_buffers()
            output = [*context.decode(keyframe_packets[pts]), *context.decode(None)]
        except av.FFmpegError as error:
            logger.debug("keyframe at pts %d did not decode (%s); decoding exactly", pts, error)
            return None
        if not output:
            return None
        frame = next((item for item in output if item.pts == pts), output[0])
        decoded[index] = frame.to_ndarray(format="rgb24")
    return VideoClip(np.stack([decoded[index] for index in chosen]), chosen, num_frames, "pyav-keyframes")
