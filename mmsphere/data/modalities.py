"""Modalities: what a shard's media member is, how it is decoded, stacked into a batch and encoded.

A :class:`Modality` declares its member extensions, its decoder (bytes -> ``[k, H, W, 3]`` uint8
pictures), its collate (decoded samples -> the batch's ``media``) and its encoder path (the dual
encoder's visual input it feeds: ``images [B, 3, H, W]`` or ``frames [B, T, 3, H, W]`` with a
frame mask). Everything that reads media — the training stream, evaluation, the feature cache,
``inspect-shards`` and the config checks — looks the modality up in :data:`MODALITY_REGISTRY`, so
yours is one :func:`register_modality` call in a module given to ``loss.imports`` / ``--imports``
(ARCHITECTURE.md, Extension points)::

    register_modality(Modality("npy-clip", ("npy",), decode_npy_clip, encoder="frames"))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mmsphere.data.decode import decode_image, decode_video
from mmsphere.registry import Registry

# the dual encoder's visual inputs; a modality feeds one of them (a new tower would be a model change)
ENCODER_PATHS = ("images", "frames")


@dataclass(frozen=True)
class DecodedMedia:
    """A decoded media member: ``pictures [k, H, W, 3]`` uint8 (k <= the frames asked for) and where they come from."""

    pictures: np.ndarray
    indices: list[int]  # source frame index of each row of ``pictures``
    num_frames: int  # frames in the source (1 for an image)
    backend: str  # which decoder produced them (reported by inspect-shards)


# (member bytes, frames asked for, the DecodeOptions, rng or None) -> DecodedMedia; raises DecodeError
Decoder = Callable[[bytes, int, Any, "np.random.Generator | None"], DecodedMedia]


@dataclass(frozen=True)
class Modality:
    """One kind of media: its member extensions (preference order), decoder, encoder path and collate."""

    name: str
    extensions: tuple[str, ...]
    decode: Decoder
    encoder: str = "frames"  # "frames": clips of data.frames through the image tower + temporal head
    collate: Callable[[Sequence[torch.Tensor]], torch.Tensor] | None = None  # None: the encoder path's stacking

    def __post_init__(self) -> None:
        if self.encoder not in ENCODER_PATHS:
            raise ValueError(f"modality {self.name!r}: encoder={self.encoder!r} must be one of {ENCODER_PATHS}")
        if not self.extensions or any(not isinstance(ext, str) or not ext or ext != ext.lower().lstrip(".")
                                      for ext in self.extensions):
            raise ValueError(f"modality {self.name!r}: extensions must be lower-case names without a dot, "
                             f"got {self.extensions!r}")

    @property
    def temporal(self) -> bool:
        """Whether a sample is a clip of ``data.frames`` frames with a frame mask (the ``frames`` path)."""
        return self.encoder == "frames"

    def clip_length(self, frames: int) -> int:
        """Frames per decoded sample when ``data.frames`` is ``frames``: it for a clip, 1 for a picture."""
        return frames if self.temporal else 1

    def stack(self, clips: Sequence[torch.Tensor]) -> torch.Tensor:
        """Decoded samples' ``[T, 3, S, S]`` tensors -> the batch's media (``[B, 3, S, S]`` or ``[B, T, 3, S, S]``)."""
        if self.collate is not None:
            return self.collate(clips)
        if self.temporal:
            return torch.stack(list(clips))
        return torch.stack([clip[0] for clip in clips])

    def inputs(self, media: torch.Tensor, frame_mask: torch.Tensor, *, cached: bool) -> dict[str, torch.Tensor]:
        """The dual encoder's visual keyword arguments for a batch's media (or its cached trunks)."""
        if not self.temporal:
            return {"image_trunk" if cached else "images": media}
        return {"frame_trunk" if cached else "frames": media, "frame_mask": frame_mask}


MODALITY_REGISTRY: Registry[Modality] = Registry(
    "modality", Modality, unknown="unknown {kind} {name!r}; known: {known}")


def register_modality(modality: Modality) -> Modality:
    """Make ``modality`` available as a data source's ``modality: <modality.name>`` and to every media reader."""
    taken = {ext: other.name for other in MODALITY_REGISTRY.values() if other.name != modality.name
             for ext in other.extensions}
    clashes = [ext for ext in modality.extensions if ext in taken]
    if clashes:
        raise ValueError(f"modality {modality.name!r}: extension(s) {', '.join(clashes)} already belong to "
                         f"{', '.join(sorted({taken[ext] for ext in clashes}))}")
    return MODALITY_REGISTRY.register(modality.name, modality)


def lookup_modality(name: str) -> Modality:
    """The registered modality ``name``; an unknown name raises ``ConfigError`` listing the known ones."""
    return MODALITY_REGISTRY.lookup(name)


def modality_names() -> tuple[str, ...]:
    """Registered modality names, in registration order (``video`` first: a sample holding both is a video)."""
    return MODALITY_REGISTRY.names()


def media_extensions() -> tuple[str, ...]:
    """Every registered modality's member extensions, in registration and preference order."""
    return tuple(ext for entry in MODALITY_REGISTRY.values() for ext in entry.extensions)


def _decode_video(data: bytes, frames: int, options: Any, rng: np.random.Generator | None) -> DecodedMedia:
    clip = decode_video(data, frames, fast=options.fast, random_offset=options.random_offset, rng=rng)
    return DecodedMedia(clip.frames, clip.indices, clip.num_frames, clip.backend)


def _decode_image(data: bytes, frames: int, options: Any, rng: np.random.Generator | None) -> DecodedMedia:
    draft_size = options.image_size if options.fast else None
    picture = decode_image(data, max_pixels=options.max_image_pixels, draft_size=draft_size)
    return DecodedMedia(picture[None], [0], 1, "pil")


register_modality(Modality("video", ("mp4", "webm", "mkv", "mov", "m4v", "avi"), _decode_video, encoder="frames"))
register_modality(Modality("image", ("jpg", "jpeg", "png", "webp"), _decode_image, encoder="images"))
