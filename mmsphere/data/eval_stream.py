"""Evaluation streams: every sample of the shards once, in shard order, decoded exactly, with all its captions."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

from torch.utils.data import IterableDataset

from mmsphere.data.batch import Batch
from mmsphere.data.batching import collate_eval
from mmsphere.data.cached import cached_reader, cached_samples
from mmsphere.data.feature_files import FeatureCache
from mmsphere.data.loading import deliver, worker_info
from mmsphere.data.reader import check_shards, read_tar_samples, split_shards
from mmsphere.data.modalities import MODALITY_REGISTRY
from mmsphere.data.samples import DecodeOptions, decode_samples
from mmsphere.data.stats import SkipCounter, SkipReport


def build_eval_loader(
    urls: str | Sequence[str],
    modality: str,
    *,
    frames: int,
    image_size: int,
    image_mean: Sequence[float],
    image_std: Sequence[float],
    batch_size: int,
    workers: int = 0,
    feature_cache: FeatureCache | None = None,
) -> EvalLoader:
    """Every sample of the shards once, decoded exactly, with all of its captions (not tokenised).

    Batches: :class:`~mmsphere.data.batch.Batch` with ``media`` frames ``[B,T,3,H,W]`` (``frame_mask [B,T]``) or
    images ``[B,3,H,W]``, ``captions`` every caption of each sample, no tokens; the last batch may be smaller. Shards are read in order (with workers, each worker
    reads every ``workers``-th shard). With ``feature_cache`` the batches are ``cached``: ``media``
    holds the trunk activations and ``caption_trunk`` each sample's text trunk features ``[n_captions, ...]``.
    """
    if modality not in MODALITY_REGISTRY:
        raise ValueError(MODALITY_REGISTRY.check(modality, "modality"))
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if workers < 0:
        raise ValueError(f"workers={workers} must be >= 0")
    if frames < 1:
        raise ValueError(f"frames={frames} must be >= 1")
    shard_urls = check_shards(urls, f"{modality} evaluation shards")
    options = DecodeOptions(
        frames=MODALITY_REGISTRY[modality].clip_length(frames),
        image_size=image_size,
        image_mean=tuple(image_mean),
        image_std=tuple(image_std),
        modality=modality,
    )
    return EvalLoader(shard_urls, options, batch_size, min(workers, len(shard_urls)), feature_cache)


class EvalLoader:
    """Iterable over evaluation batches (see :func:`build_eval_loader`)."""

    def __init__(self, urls: list[str], options: DecodeOptions, batch_size: int, workers: int,
                 feature_cache: FeatureCache | None = None):
        self.urls = urls
        self.options = options
        self.batch_size = batch_size
        self.workers = workers
        self.feature_cache = feature_cache

    def __iter__(self) -> Iterator[Batch]:
        yield from deliver(_EvalDataset(self), self.workers)


class _EvalDataset(IterableDataset):
    def __init__(self, loader: EvalLoader):
        super().__init__()
        self.loader = loader

    def __iter__(self) -> Iterator[Batch | SkipReport]:
        loader = self.loader
        worker, num_workers = worker_info()
        counter = SkipCounter()
        shards = split_shards(loader.urls, 0, 1, worker, num_workers)
        if loader.feature_cache is not None:
            samples = cached_samples(cached_reader(loader.feature_cache)(shards, counter), loader.options.modality,
                                      counter)
        else:
            samples = decode_samples(read_tar_samples(shards, counter), loader.options, counter)
        while batch := list(itertools.islice(samples, loader.batch_size)):
            yield collate_eval(batch, modality=loader.options.modality, skipped=counter.drain())
        yield SkipReport(counter.drain())


