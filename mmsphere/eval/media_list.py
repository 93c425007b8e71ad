"""Evaluation batches straight from resolved media files (a benchmark protocol or a CSV/JSONL list), without shards.

The entries come from :mod:`mmsphere.eval.benchmark` (each a key, a media file and its captions) and
every file goes through the data package's single decode path, so the frames are exactly those that
shards of the same files would give. A file that does not decode is recorded in ``failed`` rather
than raised, so that the caller can refuse the whole set or
report it as a subset.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader, Dataset

from mmsphere.data.decode import DecodeError
from mmsphere.data.batch import Batch
from mmsphere.data.batching import collate_eval
from mmsphere.data.modalities import MODALITY_REGISTRY
from mmsphere.data.sample_list import ListEntry
from mmsphere.data.samples import DecodeOptions, RawSample, decode_sample
from mmsphere.eval.completeness import MissingItem

logger = logging.getLogger(__name__)
WARNED = 3  # failures logged one by one; all of them are in ``failed``


class MediaListLoader:
    """Iterable over evaluation batches (``build_eval_loader`` layout) of ``entries``; decode failures in ``failed``."""

    def __init__(self, entries: Sequence[ListEntry], *, modality: str, frames: int, image_size: int,
                 image_mean: tuple[float, float, float], image_std: tuple[float, float, float], batch_size: int,
                 workers: int = 0) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if workers < 0:
            raise ValueError(f"workers={workers} must be >= 0")
        self.entries = list(entries)
        self.modality = modality
        self.options = DecodeOptions(frames=MODALITY_REGISTRY[modality].clip_length(frames), image_size=image_size,
                                     image_mean=tuple(image_mean), image_std=tuple(image_std), modality=modality)
        self.batch_size = batch_size
        self.workers = workers
        self.failed: list[MissingItem] = []

    def __len__(self) -> int:
        return (len(self.entries) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[Batch]:
        self.failed = []
        loader = DataLoader(_ListDataset(self.entries, self.options), batch_size=self.batch_size,
                            num_workers=self.workers, collate_fn=_keep_as_list)
        for items in loader:
            samples = [item for item in items if not isinstance(item, MissingItem)]
            failed = [item for item in items if isinstance(item, MissingItem)]
            for item in failed[:max(0, WARNED - len(self.failed))]:
                logger.warning("cannot decode %s (%s): %s", item.name, item.reason, item.detail)
            self.failed.extend(failed)
            if samples:
                yield collate_eval(samples, modality=self.modality,
                                   skipped=dict(Counter(item.reason for item in failed)))


class _ListDataset(Dataset):
    def __init__(self, entries: list[ListEntry], options: DecodeOptions) -> None:
        self.entries, self.options = entries, options

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> Any:
        entry = self.entries[index]
        media = Path(entry.media)
        try:
            data = media.read_bytes()
        except OSError as error:
            return MissingItem(entry.key, "unreadable_file", f"cannot read {str(media)!r}: {error.strerror}")
        extension = media.suffix.lower().lstrip(".")
        members = {extension: data, "json": json.dumps({"captions": entry.captions}).encode()}
        try:
            return decode_sample(RawSample(entry.key, str(media), members), self.options)
        except DecodeError as error:
            return MissingItem(entry.key, error.reason, f"{media}: {error.detail}")


def _keep_as_list(items: list[Any]) -> list[Any]:
    return items
