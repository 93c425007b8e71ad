"""One shard sample from raw tar members to model-ready frames and captions.

A raw sample is the group of tar members sharing a key (``KEY.mp4`` + ``KEY.txt`` ...). Only the
extensions listed here are ever read; nothing is unpickled. :func:`decode_sample` is the single
decode path used by training, evaluation and ``mmsphere inspect-shards``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from mmsphere.data.decode import DEFAULT_MAX_IMAGE_PIXELS, DecodeError
from mmsphere.data.modalities import MODALITY_REGISTRY, media_extensions, modality_names
from mmsphere.data.stats import SkipCounter
from mmsphere.data.transforms import to_model_frames

CAPTION_EXTENSIONS = ("txt", "json")
# the built-in modalities' extensions (make-shards writes these); a reader asks known_extensions()
VIDEO_EXTENSIONS = MODALITY_REGISTRY["video"].extensions
IMAGE_EXTENSIONS = MODALITY_REGISTRY["image"].extensions


def known_extensions() -> tuple[str, ...]:
    """The member extensions a shard reader keeps: every registered modality's media, and captions."""
    return media_extensions() + CAPTION_EXTENSIONS


@dataclass
class RawSample:
    """The members of one sample as read from a shard: extension -> bytes."""

    key: str
    url: str
    members: dict[str, bytes] = field(default_factory=dict)


@dataclass
class Sample:
    """A decoded sample: ``frames [T, 3, S, S]`` float32 (an image is one frame), all its captions."""

    key: str
    modality: str
    frames: torch.Tensor
    frame_mask: torch.Tensor
    captions: list[str]
    num_frames: int  # frames in the source clip (1 for an image)
    frame_indices: list[int]
    backend: str
    group: str = ""  # the ``group`` of its JSON, else its key (loss.positives: group)


@dataclass(frozen=True)
class DecodeOptions:
    """How samples are decoded: frame count, the model's preprocessing, modality and speed trade-offs."""

    frames: int
    image_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    modality: str | None = None  # None: whatever the sample holds (video first)
    fast: bool = False  # nearest-keyframe video and DCT-scaled JPEG decoding (training only)
    random_offset: bool = False  # random frame in each of T segments (training only)
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS

    def __post_init__(self) -> None:
        if self.frames < 1:
            raise ValueError(f"frames={self.frames} must be >= 1")
        if self.image_size < 1:
            raise ValueError(f"image_size={self.image_size} must be >= 1")
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if len(value) != 3:
                raise ValueError(f"{name}={value!r} must hold 3 values (R, G, B)")
        if any(value <= 0 for value in self.image_std):
            raise ValueError(f"image_std={self.image_std!r} must be positive")
        if self.modality is not None and self.modality not in MODALITY_REGISTRY:
            raise ValueError(f"modality={self.modality!r} must be one of {modality_names()}")
        if self.max_image_pixels < 1:
            raise ValueError(f"max_image_pixels={self.max_image_pixels} must be >= 1")


def split_member_name(name: str) -> tuple[str, str] | None:
    """``dir/key.ext.more`` -> (``dir/key``, ``ext.more``): webdataset's rule, the key ends at the first dot."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot <= slash + 1:
        return None
    return name[:dot], name[dot + 1 :].lower()


def read_captions(members: dict[str, bytes]) -> list[str]:
    """Non-empty captions of a sample from ``.json`` (``captions`` list or ``caption``) or ``.txt``.

    A ``.json`` without caption fields (e.g. img2dataset metadata) defers to the ``.txt``.
    """
    problems: list[DecodeError] = []
    if "json" in members:
        try:
            captions = _captions_from_json(members["json"])
            if captions is not None:
                return captions
        except DecodeError as error:
            problems.append(error)
    if "txt" in members:
        try:
            return _clean_captions([_decode_utf8(members["txt"], "txt")])
        except DecodeError as error:
            problems.insert(0, error)
    if problems:
        raise problems[0]
    raise DecodeError("missing_caption", "no .txt or .json member")


def read_group(members: dict[str, bytes], key: str) -> str:
    """The sample's group id: ``group`` of its ``.json`` (a string or an integer), else its key."""
    if "json" not in members:
        return key
    try:
        payload = json.loads(members["json"].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return key  # read_captions has already rejected such a member
    group = payload.get("group") if isinstance(payload, dict) else None
    if isinstance(group, bool) or not isinstance(group, (str, int)) or (isinstance(group, str) and not group.strip()):
        return key
    return str(group).strip()


def _decode_utf8(data: bytes, extension: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DecodeError("caption_not_utf8", f".{extension}: {error}") from None


def _captions_from_json(data: bytes) -> list[str] | None:
    text = _decode_utf8(data, "json")
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as error:
        raise DecodeError("bad_caption_json", str(error)) from None
    if not isinstance(payload, dict):
        raise DecodeError("bad_caption_json", f"top level is {type(payload).__name__}, not an object")
    if "captions" in payload:
        captions = payload["captions"]
        if not isinstance(captions, list) or not all(isinstance(item, str) for item in captions):
            raise DecodeError("bad_caption_json", "'captions' must be a list of strings")
        return _clean_captions(captions)
    if "caption" in payload:
        if not isinstance(payload["caption"], str):
            raise DecodeError("bad_caption_json", "'caption' must be a string")
        return _clean_captions([payload["caption"]])
    return None


def _clean_captions(captions: list[str]) -> list[str]:
    cleaned = [caption.strip() for caption in captions if caption.strip()]
    if not cleaned:
        raise DecodeError("empty_caption", f"{len(captions)} caption(s), all empty")
    return cleaned


def media_modality(members: dict[str, bytes], wanted: str | None) -> tuple[str, str]:
    """(modality, extension) of the media member to decode, or DecodeError when there is none.

    With ``wanted`` None the first registered modality present wins (a sample with a clip and a
    thumbnail is a video).
    """
    present = [(entry.name, extension) for entry in MODALITY_REGISTRY.values()
               for extension in entry.extensions if extension in members]
    for name, extension in present:
        if wanted in (None, name):
            return name, extension
    if present:
        found = ", ".join(f".{extension}" for _, extension in present)
        raise DecodeError("wrong_modality", f"source is {wanted} but the sample holds {found}")
    raise DecodeError("missing_media", f"members: {', '.join(sorted(members)) or 'none'}")


def decode_sample(raw: RawSample, options: DecodeOptions, rng: np.random.Generator | None = None) -> Sample:
    """Captions + media of a raw sample -> :class:`Sample`; raises :class:`DecodeError` with a skip reason."""
    captions = read_captions(raw.members)
    name, extension = media_modality(raw.members, options.modality)
    kind = MODALITY_REGISTRY[name]
    length = kind.clip_length(options.frames)
    media = kind.decode(raw.members[extension], length, options, rng)
    frames, frame_mask = to_model_frames(
        media.pictures, num_frames=length, image_size=options.image_size, mean=options.image_mean, std=options.image_std
    )
    return Sample(raw.key, name, frames, frame_mask, captions, media.num_frames, media.indices, media.backend,
                  read_group(raw.members, raw.key))


def decode_samples(
    raws: Iterable[RawSample],
    options: DecodeOptions,
    counter: SkipCounter,
    rng: np.random.Generator | None = None,
) -> Iterator[Sample]:
    """Pipeline stage: decode each raw sample, counting and skipping those that fail."""
    for raw in raws:
        try:
            yield decode_sample(raw, options, rng)
        except DecodeError as error:
            counter.record(error.reason, key=raw.key, url=raw.url, detail=error.detail)
