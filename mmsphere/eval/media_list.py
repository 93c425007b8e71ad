"""Evaluation batches straight from a media list (CSV/JSONL, or the MSR-VTT 1k-A CSV), without shards.

The list is parsed by :func:`mmsphere.data.sample_list.read_sample_list` (rows of one video merged into one
sample with all of its captions) and every file goes through the data package's single decode
path, so the frames are exactly those that shards of the same files would give.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader, Dataset

from mmsphere.config import MmsphereError
from mmsphere.data.decode import DecodeError
from mmsphere.data.pipeline import collate_eval
from mmsphere.data.sample_list import read_sample_list
from mmsphere.data.samples import DecodeOptions, RawSample, decode_sample
from mmsphere.data.stats import add_skipped

logger = logging.getLogger(__name__)


class MediaListLoader:
    """Iterable over evaluation batches (``build_eval_loader`` layout) of the files a media list names."""

    def __init__(self, list_file: str | os.PathLike, media_root: str | os.PathLike | None, *, modality: str,
                 frames: int, image_size: int, image_mean: tuple[float, float, float],
                 image_std: tuple[float, float, float], batch_size: int, workers: int = 0) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if workers < 0:
            raise ValueError(f"workers={workers} must be >= 0")
        self.entries, skipped_lines = read_sample_list(list_file, media_root=media_root)
        # lines the list reader could not use; reported with the results, like skipped samples
        self.skipped_lines = dict(Counter(item.reason for item in skipped_lines))
        for item in skipped_lines[:3]:
            logger.warning("list line skipped (%s) at %s %s", item.reason, item.where, item.detail)
        if not self.entries:
            raise MmsphereError(f"list {str(list_file)!r} names no usable sample (skipped lines: {self.skipped_lines})")
        self.modality = modality
        self.options = DecodeOptions(frames=frames if modality == "video" else 1, image_size=image_size,
                                     image_mean=tuple(image_mean), image_std=tuple(image_std), modality=modality)
        self.batch_size = batch_size
        self.workers = workers

    def __len__(self) -> int:
        return (len(self.entries) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        loader = DataLoader(_ListDataset(self.entries, self.options), batch_size=self.batch_size,
                            num_workers=self.workers, collate_fn=_keep_as_list)
        for items in loader:
            samples = [item for item in items if not isinstance(item, _Skipped)]
            skipped = dict(Counter(item.reason for item in items if isinstance(item, _Skipped)))
            for item in items:
                if isinstance(item, _Skipped):
                    logger.warning("skipped (%s) %s: %s", item.reason, item.where, item.detail)
            add_skipped(skipped)
            if samples:
                yield collate_eval(samples, modality=self.modality, skipped=skipped)


class _Skipped:
    def __init__(self, reason: str, where: str, detail: str) -> None:
        self.reason, self.where, self.detail = reason, where, detail


class _ListDataset(Dataset):
    def __init__(self, entries: list[Any], options: Any) -> None:
        self.entries, self.options = entries, options

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> Any:
        entry = self.entries[index]
        media = Path(entry.media)
        try:
            data = media.read_bytes()
        except OSError as error:
            return _Skipped("missing_media", entry.where or str(media), f"cannot read {str(media)!r}: {error}")
        extension = media.suffix.lower().lstrip(".")
        members = {extension: data, "json": json.dumps({"captions": entry.captions}).encode()}
        try:
            return decode_sample(RawSample(entry.key, str(media), members), self.options)
        except DecodeError as error:
            return _Skipped(error.reason, entry.where or str(media), error.detail)


def _keep_as_list(items: list[Any]) -> list[Any]:
    return items
