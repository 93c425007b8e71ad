"""Decode every sample of some shards exactly as training does, and report what came out."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from tqdm import tqdm

from mmsphere.data.decode import DEFAULT_MAX_IMAGE_PIXELS
from mmsphere.data.loading import iterate_single_threaded
from mmsphere.data.modalities import MODALITY_REGISTRY
from mmsphere.data.reader import check_shards, read_tar_samples
from mmsphere.data.samples import DecodeOptions, decode_samples
from mmsphere.data.stats import SkipCounter, add_skipped


@dataclass
class InspectReport:
    """Decoded samples by modality, skips by reason and frame statistics of some shards."""

    shards: int
    frames: int
    decoded_by_modality: dict[str, int] = field(default_factory=dict)
    skipped_by_reason: dict[str, int] = field(default_factory=dict)
    decoded_by_backend: dict[str, int] = field(default_factory=dict)
    clip_frames: list[int] = field(default_factory=list)  # frames in each decoded video
    captions_per_sample: list[int] = field(default_factory=list)

    @property
    def decoded(self) -> int:
        return sum(self.decoded_by_modality.values())

    @property
    def skipped(self) -> int:
        return sum(self.skipped_by_reason.values())

    def to_dict(self) -> dict:
        """Plain JSON-ready summary (what ``inspect-shards --json`` prints)."""
        clip_frames = np.asarray(self.clip_frames)
        captions = np.asarray(self.captions_per_sample)
        return {
            "shards": self.shards,
            "decoded": self.decoded,
            "decoded_by_modality": dict(sorted(self.decoded_by_modality.items())),
            "skipped": self.skipped,
            "skipped_by_reason": dict(sorted(self.skipped_by_reason.items())),
            "decoded_by_backend": dict(sorted(self.decoded_by_backend.items())),
            "frames_requested": self.frames,
            "video_frames": {
                "clips": int(clip_frames.size),
                "min": int(clip_frames.min()) if clip_frames.size else None,
                "median": float(np.median(clip_frames)) if clip_frames.size else None,
                "mean": float(clip_frames.mean()) if clip_frames.size else None,
                "max": int(clip_frames.max()) if clip_frames.size else None,
                "shorter_than_requested": int((clip_frames < self.frames).sum()),
            },
            "captions_per_sample": {
                "min": int(captions.min()) if captions.size else None,
                "mean": float(captions.mean()) if captions.size else None,
                "max": int(captions.max()) if captions.size else None,
            },
        }


def inspect_shards(
    urls: str | Sequence[str],
    *,
    frames: int = 8,
    image_size: int = 224,
    modality: str | None = None,
    fast: bool = False,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    progress: bool = True,
) -> InspectReport:
    """Push every sample of ``urls`` through the training decode path (tar reader -> :func:`decode_samples`)."""
    shard_urls = check_shards(urls, "shards to inspect")
    options = DecodeOptions(
        frames=frames,
        image_size=image_size,
        image_mean=OPENAI_DATASET_MEAN,
        image_std=OPENAI_DATASET_STD,
        modality=modality,
        fast=fast,
        max_image_pixels=max_image_pixels,
    )
    counter = SkipCounter()
    modalities: Counter[str] = Counter()
    backends: Counter[str] = Counter()
    report = InspectReport(shards=len(shard_urls), frames=frames)
    rng = np.random.default_rng(0)
    samples = iterate_single_threaded(decode_samples(read_tar_samples(shard_urls, counter), options, counter, rng))
    for sample in tqdm(samples, desc="inspect", unit="sample", disable=not progress):
        modalities[sample.modality] += 1
        backends[sample.backend] += 1
        report.captions_per_sample.append(len(sample.captions))
        if MODALITY_REGISTRY[sample.modality].temporal:
            report.clip_frames.append(sample.num_frames)
    add_skipped(counter.drain())
    report.decoded_by_modality = dict(modalities)
    report.decoded_by_backend = dict(backends)
    report.skipped_by_reason = dict(counter.totals)
    return report
