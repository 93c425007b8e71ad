"""Read a feature cache as a stream of raw samples, in the order and with the skips of the shards themselves.

The read side of the feature cache lives in the data layer so that the streams read it without
importing :mod:`mmsphere.cache`, which builds caches with the models (a layer above; ARCHITECTURE.md).

The training and evaluation streams put these where they would put tar samples: the same shard
order, shuffle buffer and numbering, so a cached stream hands out the same samples, captions and
skip counts as an uncached one; "decoding" a cached sample is a lookup.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from mmsphere.data.feature_files import FeatureCache, ShardFeatures, read_shard_features
from mmsphere.data.decode import DecodeError
from mmsphere.data.stats import SkipCounter


@dataclass
class CachedSample:
    """A sample's trunk features: ``trunk [...]`` (image) or ``[T, ...]`` (video), and one text trunk row per caption."""

    key: str
    modality: str
    trunk: torch.Tensor
    frame_mask: torch.Tensor
    captions: list[str]
    caption_trunk: torch.Tensor  # [len(captions), ...]
    group: str


@dataclass
class CachedRaw:
    """One raw sample of a cached shard: a decoded row of its feature file, or a recorded decode failure."""

    key: str
    url: str
    shard: ShardFeatures
    record: dict

    def decode(self, modality: str) -> CachedSample:
        """The sample's features; raises the :class:`DecodeError` the shard's sample raised when the cache was built."""
        if "row" not in self.record:
            raise DecodeError(self.record["skip"], self.record.get("detail", ""))
        row, shard = self.record["row"], self.shard
        if shard.frame_mask is not None:
            frame_mask = shard.frame_mask[row]
        else:
            frame_mask = torch.ones(1, dtype=torch.bool)
        return CachedSample(self.key, modality, shard.trunk[row], frame_mask, list(self.record["captions"]),
                            shard.caption_trunk(row), self.record.get("group", self.key))


def cached_reader(cache: FeatureCache) -> Callable[..., Iterator[CachedRaw]]:
    """A drop-in for :func:`mmsphere.data.reader.read_tar_samples` that reads ``cache`` instead of the tars."""

    def read(urls: Iterable[str], counter: SkipCounter, *, on_shard_end=None, **_: object) -> Iterator[CachedRaw]:
        for url in urls:
            shard = read_shard_features(cache, url)
            for reason, count in shard.reader_skips.items():
                for _ in range(count):
                    counter.record(reason, url=url)
            for record in shard.records:
                yield CachedRaw(record["key"], url, shard, record)
            if on_shard_end is not None:
                on_shard_end(url, len(shard.records))

    return read


def cached_samples(raws: Iterable[CachedRaw], modality: str, counter: SkipCounter) -> Iterator[CachedSample]:
    """The cached samples of ``raws`` in order, each recorded decode failure counted in ``counter`` and left out."""
    for raw in raws:
        try:
            yield raw.decode(modality)
        except DecodeError as error:
            counter.record(error.reason, key=raw.key, url=raw.url, detail=error.detail)
