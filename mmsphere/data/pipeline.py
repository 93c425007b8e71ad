"""Training and evaluation streams over webdataset shards.

Per source, a webdataset ``DataPipeline``: shard list (reshuffled by seed and epoch, split by node
then by worker) or resampled shards -> tolerant tar reader -> seeded shuffle buffer; then decode.
A training stream draws, for each batch, one source by weight and fills the batch from it alone, so
every batch is homogeneous (one source, one modality); the draw depends on the batch's index in
the epoch, not on the rank, so the global batch is homogeneous too (DESIGN §3). Each pass over a :class:`TrainStream` is a
virtual epoch of exactly ``len(stream)`` batches on every rank, so data-parallel ranks never wait
on one another at the end of an epoch.

Resume: the raw samples that come out of a source's shuffle buffer are numbered, per rank, loader
worker and source, and a sample's decode and caption draws are seeded by its number alone.
:meth:`TrainStream.state_dict` records, after each batch handed out, the epoch, the next batch and
how many raw samples each worker has taken from each source; a stream loaded with it replays only
the cheap part (shard order, tar read, shuffle buffer), passes over that many raw samples without
decoding them, and goes on with exactly the batches an uninterrupted stream makes (finite shards;
a resampled stream starts a fresh epoch instead).

Rank and world size are passed in, never read from ``torch.distributed``; each rank builds its own
stream, which must not go through ``accelerator.prepare``. Skipped samples reach
:func:`mmsphere.data.stats.skipped_counts` through ``batch["skipped"]`` (see :mod:`.stats`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import json
import logging
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mmsphere.cache.samples import CachedRaw, CachedSample, cached_reader
from mmsphere.cache.store import FeatureCache
from mmsphere.config import ConfigError, DataConfig, DataError, MmsphereError, SourceConfig
from mmsphere.data.reader import check_shards, read_tar_samples, resampled_shards, shuffled, split_shards, stream_seed
from mmsphere.data.decode import DecodeError
from mmsphere.data.samples import (IMAGE_EXTENSIONS, MODALITIES, VIDEO_EXTENSIONS, DecodeOptions, RawSample, Sample,
                                   decode_sample, decode_samples)
from mmsphere.data.stats import SkipCounter, SkipReport, SkipTally, add_skipped

logger = logging.getLogger(__name__)

Tokenizer = Callable[[list[str]], torch.Tensor]

# A resampled source that produces nothing for this long is broken, not unlucky: stop with an
# error rather than spin forever.
MAX_FAILED_SAMPLES_IN_A_ROW = 10_000
MIN_EMPTY_SHARDS_IN_A_ROW = 64
SHUFFLE_INITIAL = 100
# A source whose first samples all hold media of the other modality only is declared wrongly (image
# shards given as a video source): say so after this many, not after MAX_FAILED_SAMPLES_IN_A_ROW.
WRONG_MODALITY_SAMPLES = 16


@dataclass(frozen=True)
class _Source:
    name: str
    modality: str
    weight: float
    urls: tuple[str, ...]
    options: DecodeOptions
    cache: FeatureCache | None = None  # read trunk features from here instead of decoding


def build_train_stream(
    sources: Sequence[SourceConfig],
    data: DataConfig,
    *,
    image_size: int,
    image_mean: Sequence[float],
    image_std: Sequence[float],
    tokenizer: Tokenizer,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    epoch: int = 0,
    split: str = "train",
    skipped: SkipTally | None = None,
    feature_caches: dict[str, FeatureCache] | None = None,
) -> TrainStream:
    """One rank's stream of homogeneous training batches, interleaving ``sources`` by weight.

    Batches: ``{"key", "source", "modality", "frames" [B,T,3,H,W], "frame_mask" [B,T], "text" [B,L],
    "caption", "group", "skipped"}`` (images: ``T = 1``; ``group``: each sample's group id). ``split`` names the stream (``"train"``,
    ``"meta"``) and enters its seeds, so two streams over the same shards draw differently.
    ``skipped``: where this run's skip counts go (besides the process-wide totals).
    ``feature_caches``: per modality, a feature cache to read instead of decoding; the batches of such
    a source hold ``image_trunk [B,...]`` (images) or ``frame_trunk [B,T,...]`` + ``frame_mask``, and
    ``text_trunk [B,...]`` instead of pixels and tokens, the same samples and captions otherwise.
    """
    if not sources:
        raise ConfigError(f"{split} stream: no data source given (data.train is empty?)")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank}, world_size={world_size}: need 0 <= rank < world_size")
    if data.workers < 0:
        raise ConfigError(f"data.workers={data.workers} must be >= 0")
    if data.epoch_samples < 1:
        raise ConfigError(f"data.epoch_samples={data.epoch_samples} must be >= 1")
    _check_tokenizer(tokenizer)
    size = data.image_size if data.image_size is not None else image_size
    resolved = []
    for index, source in enumerate(sources):
        name = source.name or f"{split}{index}"
        where = f"data source {name!r}"
        if source.modality not in MODALITIES:
            raise ConfigError(f"{where}: modality={source.modality!r} must be one of {MODALITIES}")
        if not source.weight > 0:
            raise ConfigError(f"{where}: weight={source.weight} must be > 0")
        urls = check_shards(source.urls, where)
        processes = world_size * max(1, data.workers)
        if not data.resampled and len(urls) < processes:
            raise ConfigError(
                f"{where}: {len(urls)} shard(s) for {world_size} process(es) x {max(1, data.workers)} "
                f"worker(s) = {processes} readers; each reader needs at least one shard. Write more, "
                f"smaller shards (make-shards --maxcount), lower data.workers, or set data.resampled=true"
            )
        options = DecodeOptions(
            frames=data.frames,
            image_size=size,
            image_mean=tuple(image_mean),
            image_std=tuple(image_std),
            modality=source.modality,
            fast=data.fast_decode,
            random_offset=data.random_offset,
        )
        cache = (feature_caches or {}).get(source.modality)
        resolved.append(_Source(name, source.modality, float(source.weight), tuple(urls), options, cache))
    return TrainStream(
        resolved,
        tokenizer=tokenizer,
        batch_size=batch_size,
        num_batches=max(1, data.epoch_samples // batch_size),
        workers=data.workers,
        shuffle_buffer=data.shuffle_buffer,
        resampled=data.resampled,
        rank=rank,
        world_size=world_size,
        seed=seed,
        epoch=epoch,
        split=split,
        skipped=skipped,
    )


class TrainStream:
    """Iterable of training batches; each pass is one virtual epoch, after which ``epoch`` advances.

    A pass starts at the first batch of ``epoch``, or where :meth:`load_state_dict` put the stream;
    :meth:`state_dict` says where the batches handed out so far leave it.
    """

    def __init__(
        self,
        sources: list[_Source],
        *,
        tokenizer: Tokenizer,
        batch_size: int,
        num_batches: int,
        workers: int,
        shuffle_buffer: int,
        resampled: bool,
        rank: int,
        world_size: int,
        seed: int,
        epoch: int,
        split: str,
        skipped: SkipTally | None = None,
    ):
        self.sources = sources
        self.skipped = skipped if skipped is not None else SkipTally()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.num_batches = num_batches
        self.workers = workers
        self.shuffle_buffer = shuffle_buffer
        self.resampled = resampled
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.epoch = epoch
        self.split = split
        self._batch = 0  # next batch of ``epoch``
        self._consumed = self._nothing_consumed()  # [reader][source]: raw samples taken so far
        self._resume_pending = False

    def __len__(self) -> int:
        return self.num_batches

    @property
    def readers(self) -> int:
        """Loader workers (one when batches are made in this process); batch ``b`` comes from reader ``b % readers``."""
        return max(1, self.workers)

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass epoch ``epoch`` from its first batch (e.g. when resuming)."""
        self.epoch = epoch
        self._batch, self._consumed, self._resume_pending = 0, self._nothing_consumed(), False

    def state_dict(self) -> dict:
        """Where the batches handed out so far leave this rank's stream, as JSON-ready data.

        ``{"epoch", "batch", "consumed", "layout"}``: the epoch and index of the next batch, for each
        loader worker and source the number of raw (shuffled, not yet decoded) samples taken, and
        what these numbers depend on (sources, batch size, workers, shuffle buffer, rank, ...).
        """
        epoch, batch, consumed = self.epoch, self._batch, self._consumed
        if batch >= self.num_batches:
            epoch, batch, consumed = epoch + 1, 0, self._nothing_consumed()
        return {"epoch": epoch, "batch": batch, "consumed": [list(row) for row in consumed], "layout": self.layout()}

    def load_state_dict(self, state: dict) -> None:
        """Continue where ``state`` (from :meth:`state_dict`) was taken, from the next pass on.

        Finite shards: at the very next batch, exactly as if the stream had never stopped. Resampled
        shards, or a stream laid out differently from the one that saved ``state`` (other sources,
        batch size, workers, shuffle buffer, processes ...): with a fresh epoch, the one after the
        epoch in progress.
        """
        epoch, batch = int(state["epoch"]), int(state["batch"])
        next_epoch = epoch + 1 if batch else epoch
        if self.resampled:
            logger.info("%s stream: resampled shards, resuming with a fresh epoch %d", self.split, next_epoch)
            self.set_epoch(next_epoch)
            return
        changed = sorted(name for name, value in self.layout().items() if state.get("layout", {}).get(name) != value)
        if changed:
            logger.warning("%s stream: the data layout changed since the checkpoint (%s), so its position does not "
                           "apply; resuming with a fresh epoch %d", self.split, ", ".join(changed), next_epoch)
            self.set_epoch(next_epoch)
            return
        self.epoch, self._batch = epoch, batch
        self._consumed = [[int(count) for count in row] for row in state["consumed"]]
        self._resume_pending = True

    def layout(self) -> dict:
        """What the numbers of :meth:`state_dict` depend on, JSON-ready (shard lists as digests)."""
        sources = [{"name": source.name, "weight": source.weight, "shards": len(source.urls),
                    "urls_sha256": hashlib.sha256(json.dumps(source.urls).encode()).hexdigest()[:16]}
                   for source in self.sources]
        return {"sources": sources, "batch_size": self.batch_size, "num_batches": self.num_batches,
                "readers": self.readers, "shuffle_buffer": self.shuffle_buffer, "resampled": self.resampled,
                "rank": self.rank, "world_size": self.world_size, "seed": self.seed, "split": self.split}

    def source_of(self, batch_index: int, epoch: int) -> int:
        """Index of the source batch ``batch_index`` of ``epoch`` is drawn from, the same on every rank.

        The draw is seeded by seed, split, epoch and batch index, never by rank or worker: the
        global batch is one modality, so every rank runs the same encoder path and the same
        collectives in each step (a video batch on one rank and an image batch on another left
        the ranks waiting in different collectives for ever).
        """
        if len(self.sources) == 1:
            return 0
        chooser = random.Random(stream_seed(self.seed, self.split, epoch, batch_index, "interleave"))
        return chooser.choices(range(len(self.sources)), [source.weight for source in self.sources])[0]

    def __iter__(self) -> Iterator[dict]:
        epoch = self.epoch
        if not self._resume_pending:
            self._batch, self._consumed = 0, self._nothing_consumed()
        self._resume_pending = False
        dataset = _TrainDataset(self, epoch, self._batch, [list(row) for row in self._consumed])
        for index, batch in enumerate(_deliver(dataset, self.workers, self.skipped), self._batch):
            self._consumed[index % self.readers] = batch.pop("consumed")
            self._batch = index + 1
            yield batch
        self.set_epoch(epoch + 1)

    def _nothing_consumed(self) -> list[list[int]]:
        return [[0] * len(self.sources) for _ in range(self.readers)]


class _TrainDataset(IterableDataset):
    """What each loader worker runs: its share of one epoch's batches, from batch ``start`` on.

    ``consumed[worker][source]``: raw samples each worker already took from each source (resume).
    """

    def __init__(self, stream: TrainStream, epoch: int, start: int = 0, consumed: list[list[int]] | None = None):
        super().__init__()
        self.stream = stream
        self.epoch = epoch
        self.start = start
        self.consumed = consumed if consumed is not None else stream._nothing_consumed()

    def __iter__(self) -> Iterator[dict | SkipReport]:
        stream = self.stream
        process, num_workers = _worker_info()
        # the loader hands out batches from its worker processes in turn, starting with process 0,
        # and batch b of an epoch is worker b % W's: a pass that starts at batch `start` has process 0
        # play worker start % W
        worker = (process + self.start) % num_workers
        counter = SkipCounter()
        batch_indices = range(self.start + (worker - self.start) % num_workers, stream.num_batches, num_workers)
        if batch_indices:
            consumed = list(self.consumed[worker])
            per_source = [self._samples(index, worker, num_workers, counter, consumed[index])
                          for index in range(len(stream.sources))]
            for batch_index in batch_indices:
                index = stream.source_of(batch_index, self.epoch)
                numbered = list(itertools.islice(per_source[index], stream.batch_size))
                consumed[index] = numbered[-1].position
                source = stream.sources[index]
                batch = collate_train(
                    [item.sample for item in numbered],
                    [item.caption for item in numbered],
                    [item.choice for item in numbered],
                    source=source.name,
                    modality=source.modality,
                    tokenizer=stream.tokenizer,
                    skipped=counter.drain(),
                )
                batch["consumed"] = list(consumed)  # taken off again by TrainStream.__iter__
                yield batch
        yield SkipReport(counter.drain())

    def _samples(
        self, index: int, worker: int, num_workers: int, counter: SkipCounter, skip: int = 0
    ) -> Iterator[_Numbered]:
        """An endless stream of decoded samples of one source for this rank and worker.

        Raw samples are numbered 1, 2, ... in the order the shuffle buffer gives them; the first
        ``skip`` are passed over without being decoded (they were used before a resume).
        """
        stream, source = self.stream, self.stream.sources[index]
        ids = (stream.seed, stream.split, self.epoch, stream.rank, worker, index)
        shuffle_rng = random.Random(stream_seed(*ids, "shuffle"))
        decoder = _Decoder(source, counter, stream_seed(*ids, "decode"), stream_seed(*ids, "captions"))
        reader = cached_reader(source.cache) if source.cache is not None else read_tar_samples
        if stream.resampled:
            guard = _StallGuard(source, len(source.urls), stream.shuffle_buffer, counter)
            shards = functools.partial(resampled_shards, source.urls, stream_seed(*ids, "shards"))
            raws = _raw_pipeline(shards, counter, stream.shuffle_buffer, shuffle_rng, guard, reader)
            decoded = (decoder(raw, position) for position, raw in enumerate(raws, 1))
            yield from guard.count_decoded(item for item in decoded if item is not None)
            return
        position = 0
        # the reader's skips (damaged tars, unknown members, duplicate keys, ...) up to the last sample
        # passed over were counted before the checkpoint, in the batch that sample went into: reading
        # them again must not count them twice (decode failures are not repeated: nothing passed over
        # is decoded). Both runs read exactly the same to reach that sample, so the counts match.
        counter.replaying = skip > 0
        for repetition in itertools.count():
            # the same order on every rank, so that the node split is a partition
            order = shuffled(source.urls, stream_seed(stream.seed, stream.split, self.epoch, repetition, index))
            mine = split_shards(order, stream.rank, stream.world_size, worker, num_workers)
            passed_over, decoded = position < skip, 0
            for raw in _raw_pipeline(mine, counter, stream.shuffle_buffer, shuffle_rng, reader=reader):
                position += 1
                if position <= skip:
                    counter.replaying = position < skip
                    continue
                item = decoder(raw, position)
                if item is not None:
                    decoded += 1
                    yield item
            if decoded == 0 and not passed_over:
                misdeclared = decoder.modality_error()
                if misdeclared is not None:
                    raise misdeclared
                raise MmsphereError(
                    f"data source {source.name!r}: a full pass over its {len(mine)} shard(s) for rank "
                    f"{stream.rank}, worker {worker} gave no decodable sample (skipped: {dict(counter.totals)}); "
                    f"check them with `mmsphere inspect-shards`"
                )


@dataclass(frozen=True)
class _Numbered:
    """A decoded sample, its caption for this epoch, and how many raw samples its source had given up to it."""

    position: int
    sample: Sample | CachedSample
    caption: str
    choice: int  # the caption's index among the sample's captions


class _Decoder:
    """Decodes the raw sample numbered ``position``, with decode and caption draws seeded by that number.

    Seeding each sample by its number, instead of drawing from one generator, makes its draws
    independent of how many samples before it were decoded, failed or were passed over on resume.
    Raises :class:`DataError` when the first :data:`WRONG_MODALITY_SAMPLES` samples all hold only
    media of the other modality.
    """

    def __init__(self, source: _Source, counter: SkipCounter, decode_seed: int, caption_seed: int):
        self.source = source
        self.options = source.options
        self.counter = counter
        self.decode_seed = decode_seed
        self.caption_seed = caption_seed
        self.decoded = 0
        self.failed = 0
        self.wrong_modality: list[RawSample] = []  # while nothing has decoded yet

    def __call__(self, raw: RawSample | CachedRaw, position: int) -> _Numbered | None:
        rng = np.random.default_rng([self.decode_seed, position]) if self.options.random_offset else None
        try:
            if isinstance(raw, CachedRaw):
                sample = raw.decode(self.options.modality)
            else:
                sample = decode_sample(raw, self.options, rng)
        except DecodeError as error:
            self.counter.record(error.reason, key=raw.key, url=raw.url, detail=error.detail)
            if not self.decoded:
                self.failed += 1
                if error.reason == "wrong_modality" and isinstance(raw, RawSample):
                    self.wrong_modality.append(raw)
                if len(self.wrong_modality) >= WRONG_MODALITY_SAMPLES:
                    misdeclared = self.modality_error()
                    if misdeclared is not None:
                        raise misdeclared
            return None
        self.decoded += 1
        choice = 0
        if len(sample.captions) > 1:
            # random.Random seeds from an int in microseconds; a numpy generator takes ~40 µs
            choice = random.Random((self.caption_seed << 64) | position).randrange(len(sample.captions))
        return _Numbered(position, sample, sample.captions[choice], choice)

    def modality_error(self) -> DataError | None:
        """The error for a source declared with the wrong modality: every sample tried so far held only the other."""
        if self.decoded or not self.failed or len(self.wrong_modality) < self.failed:
            return None
        declared = self.source.modality
        expected = VIDEO_EXTENSIONS if declared == "video" else IMAGE_EXTENSIONS
        found = sorted({extension for raw in self.wrong_modality for extension in raw.members
                        if extension in VIDEO_EXTENSIONS + IMAGE_EXTENSIONS})
        other = "image" if declared == "video" else "video"
        first = self.wrong_modality[0]
        return DataError(
            f"data source {self.source.name!r} has modality={declared}, but its first {len(self.wrong_modality)} "
            f"samples hold {', '.join('.' + extension for extension in found)} and none of "
            f"{', '.join('.' + extension for extension in expected)} (e.g. {first.key} in {first.url}): set the "
            f"source's modality to {other}, or point its urls at {declared} shards")


class _StallGuard:
    """Stops a resampled source that has long stopped producing samples, instead of hanging."""

    def __init__(self, source: _Source, num_shards: int, shuffle_buffer: int, counter: SkipCounter):
        self.source = source
        self.counter = counter
        self.max_empty_shards = max(MIN_EMPTY_SHARDS_IN_A_ROW, 4 * num_shards)
        self.max_failed = MAX_FAILED_SAMPLES_IN_A_ROW + shuffle_buffer
        self.empty_shards = 0
        self.raw_since_success = 0

    def shard_done(self, url: str, samples: int) -> None:
        self.empty_shards = 0 if samples else self.empty_shards + 1
        if self.empty_shards >= self.max_empty_shards:
            self._fail(f"{self.empty_shards} shards in a row gave no sample (last: {url})")

    def count_raw(self, raws: Iterable) -> Iterator:
        for raw in raws:
            self.raw_since_success += 1
            if self.raw_since_success >= self.max_failed:
                self._fail(f"{self.raw_since_success} samples in a row failed to decode")
            yield raw

    def count_decoded(self, samples: Iterable[_Numbered]) -> Iterator[_Numbered]:
        for sample in samples:
            self.raw_since_success = 0
            yield sample

    def _fail(self, what: str) -> None:
        raise MmsphereError(
            f"data source {self.source.name!r}: {what} (skipped so far: {dict(self.counter.totals)}); "
            f"check the shards with `mmsphere inspect-shards`"
        )


def _raw_pipeline(
    shards: Iterable[str] | Callable[[], Iterator[str]],
    counter: SkipCounter,
    shuffle_buffer: int,
    shuffle_rng: random.Random,
    guard: _StallGuard | None = None,
    reader: Callable[..., Iterator] = read_tar_samples,
) -> wds.DataPipeline:
    """Shards -> tolerant tar reader (or a feature cache's reader) -> shuffle buffer: raw samples, not decoded."""
    # DataPipeline would splice a list argument in as stages: hand it a callable that yields URLs
    first = shards if callable(shards) else functools.partial(iter, list(shards))
    return wds.DataPipeline(
        first,
        functools.partial(reader, counter=counter, on_shard_end=guard.shard_done if guard else None),
        guard.count_raw if guard else None,
        wds.shuffle(shuffle_buffer, initial=min(SHUFFLE_INITIAL, shuffle_buffer), rng=shuffle_rng)
        if shuffle_buffer > 1
        else None,
    )


def collate_train(
    samples: list[Sample] | list[CachedSample],
    captions: list[str],
    choices: list[int],
    *,
    source: str,
    modality: str,
    tokenizer: Tokenizer,
    skipped: dict[str, int],
) -> dict:
    """Stack decoded samples into a training batch with the caption drawn for each, tokenised (or its text trunk features)."""
    if samples and isinstance(samples[0], CachedSample):
        visual = "image_trunk" if modality == "image" else "frame_trunk"
        return {
            "key": [sample.key for sample in samples],
            "source": source,
            "modality": modality,
            visual: torch.stack([sample.trunk for sample in samples]),
            "frame_mask": torch.stack([sample.frame_mask for sample in samples]),
            "text_trunk": torch.stack([sample.caption_trunk[choice] for sample, choice in zip(samples, choices)]),
            "caption": list(captions),
            "group": [sample.group for sample in samples],
            "skipped": skipped,
        }
    return {
        "key": [sample.key for sample in samples],
        "source": source,
        "modality": modality,
        "frames": torch.stack([sample.frames for sample in samples]),
        "frame_mask": torch.stack([sample.frame_mask for sample in samples]),
        "text": tokenizer(captions),
        "caption": list(captions),
        "group": [sample.group for sample in samples],
        "skipped": skipped,
    }


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

    Batches: ``{"key", "modality", "frames" [B,T,3,H,W], "frame_mask" [B,T], "captions": list[list[str]],
    "skipped"}``; the last batch may be smaller. Shards are read in order (with workers, each worker
    reads every ``workers``-th shard). With ``feature_cache``, ``image_trunk [B,...]`` or
    ``frame_trunk [B,T,...]`` replace ``frames``, and ``caption_trunk`` holds each sample's text
    trunk features ``[n_captions, ...]``.
    """
    if modality not in MODALITIES:
        raise ValueError(f"modality={modality!r} must be one of {MODALITIES}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if workers < 0:
        raise ValueError(f"workers={workers} must be >= 0")
    if frames < 1:
        raise ValueError(f"frames={frames} must be >= 1")
    shard_urls = check_shards(urls, f"{modality} evaluation shards")
    options = DecodeOptions(
        frames=frames if modality == "video" else 1,
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

    def __iter__(self) -> Iterator[dict]:
        yield from _deliver(_EvalDataset(self), self.workers)


class _EvalDataset(IterableDataset):
    def __init__(self, loader: EvalLoader):
        super().__init__()
        self.loader = loader

    def __iter__(self) -> Iterator[dict | SkipReport]:
        loader = self.loader
        worker, num_workers = _worker_info()
        counter = SkipCounter()
        shards = split_shards(loader.urls, 0, 1, worker, num_workers)
        if loader.feature_cache is not None:
            samples = _cached_samples(cached_reader(loader.feature_cache)(shards, counter), loader.options.modality,
                                      counter)
        else:
            samples = decode_samples(read_tar_samples(shards, counter), loader.options, counter)
        while batch := list(itertools.islice(samples, loader.batch_size)):
            yield collate_eval(batch, modality=loader.options.modality, skipped=counter.drain())
        yield SkipReport(counter.drain())


def _cached_samples(raws: Iterable[CachedRaw], modality: str, counter: SkipCounter) -> Iterator[CachedSample]:
    for raw in raws:
        try:
            yield raw.decode(modality)
        except DecodeError as error:
            counter.record(error.reason, key=raw.key, url=raw.url, detail=error.detail)


def collate_eval(samples: list[Sample] | list[CachedSample], *, modality: str, skipped: dict[str, int]) -> dict:
    """Stack decoded samples into an evaluation batch, keeping every caption."""
    if samples and isinstance(samples[0], CachedSample):
        return {
            "key": [sample.key for sample in samples],
            "modality": modality,
            "image_trunk" if modality == "image" else "frame_trunk": torch.stack([sample.trunk for sample in samples]),
            "frame_mask": torch.stack([sample.frame_mask for sample in samples]),
            "captions": [list(sample.captions) for sample in samples],
            "caption_trunk": [sample.caption_trunk for sample in samples],
            "group": [sample.group for sample in samples],
            "skipped": skipped,
        }
    return {
        "key": [sample.key for sample in samples],
        "modality": modality,
        "frames": torch.stack([sample.frames for sample in samples]),
        "frame_mask": torch.stack([sample.frame_mask for sample in samples]),
        "captions": [list(sample.captions) for sample in samples],
        "group": [sample.group for sample in samples],
        "skipped": skipped,
    }


def _deliver(dataset: IterableDataset, workers: int, tally: SkipTally | None = None) -> Iterator[dict]:
    """Run ``dataset`` in this process or in ``workers`` loader processes; fold skip counts into the totals.

    An :class:`MmsphereError` raised in a loader worker is raised here as it was, not as the
    DataLoader's re-raise with the worker's whole traceback for a message.
    """
    if workers == 0:
        items: Iterable = iterate_single_threaded(iter(dataset))
    else:
        # batch_size=None: the dataset yields finished batches (and a final SkipReport per worker)
        items = DataLoader(_ErrorsAsItems(dataset), batch_size=None, num_workers=workers, prefetch_factor=2)
    for item in items:
        if isinstance(item, _RaisedInWorker):
            raise item.error
        counts = item.counts if isinstance(item, SkipReport) else item["skipped"]
        add_skipped(counts)
        if tally is not None:
            tally.add(counts)
        if not isinstance(item, SkipReport):
            yield item


class _RaisedInWorker:
    """An :class:`MmsphereError` of a loader worker, on its way to the main process as an item."""

    def __init__(self, error: MmsphereError):
        self.error = error


class _ErrorsAsItems(IterableDataset):
    """``dataset``, with an :class:`MmsphereError` it raises handed on as its last item."""

    def __init__(self, dataset: IterableDataset):
        super().__init__()
        self.dataset = dataset

    def __iter__(self) -> Iterator:
        try:
            yield from self.dataset
        except MmsphereError as error:
            yield _RaisedInWorker(error)


@contextlib.contextmanager
def single_threaded_torch() -> Iterator[None]:
    """Run torch ops on one thread inside the block, as DataLoader workers do.

    Per-sample tensors are small; splitting them across OpenMP threads that compete with the
    decoder's threads (or with other processes) made a 12-frame clip take ~30 ms per op instead
    of 0.02 ms on a loaded 2-core machine.
    """
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def iterate_single_threaded(items: Iterator) -> Iterator:
    """Produce each item of ``items`` with :func:`single_threaded_torch`, releasing it between items."""
    while True:
        with single_threaded_torch():
            item = next(items, _END)
        if item is _END:
            return
        yield item


_END = object()


def _worker_info() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def _share(total: int, worker: int, num_workers: int) -> int:
    """Worker ``worker``'s part of ``total`` items split as evenly as possible."""
    return total // num_workers + (1 if worker < total % num_workers else 0)


def _check_tokenizer(tokenizer: Tokenizer) -> None:
    if not callable(tokenizer):
        raise TypeError(f"tokenizer must be callable list[str] -> LongTensor[N, L], got {type(tokenizer).__name__}")
    probe = tokenizer(["a photo", "a video"])
    if not isinstance(probe, torch.Tensor) or probe.ndim != 2 or probe.shape[0] != 2:
        shape = tuple(probe.shape) if isinstance(probe, torch.Tensor) else type(probe).__name__
        raise TypeError(f"tokenizer must return a tensor [N, L] for N captions, got {shape}")
