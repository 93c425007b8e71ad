"""Source mixing and rank/worker splitting: one rank's stream of homogeneous training batches.

Per source, a webdataset ``DataPipeline``: shard list (reshuffled by seed and epoch, split by node
then by worker) or resampled shards -> tolerant tar reader -> seeded shuffle buffer; then decode
(:mod:`.source_samples`) and batch (:mod:`.batching`). A training stream draws, for each batch, one
source by weight and fills the batch from it alone, so every batch is homogeneous (one source, one
modality); the draw depends on the batch's index in the epoch, not on the rank, so the global batch
is homogeneous too (ARCHITECTURE.md). Each pass over a :class:`TrainStream` is a virtual epoch of
exactly ``len(stream)`` batches on every rank, so data-parallel ranks never wait on one another at
the end of an epoch.

Resume: the raw samples that come out of a source's shuffle buffer are numbered, per rank, loader
worker and source, and a sample's decode and caption draws are seeded by its number alone.
:meth:`TrainStream.state_dict` records, after each batch handed out, the epoch, the next batch and
how many raw samples each worker has taken from each source; a stream loaded with it replays only
the cheap part (shard order, tar read, shuffle buffer), passes over that many raw samples without
decoding them, and goes on with exactly the batches an uninterrupted stream makes (finite shards;
a resampled stream starts a fresh epoch instead).

Rank and world size are passed in, never read from ``torch.distributed``; each rank builds its own
stream, which must not go through ``accelerator.prepare``. Skipped samples reach
:func:`mmsphere.data.stats.skipped_counts` through each batch's ``skipped`` (see :mod:`.stats`).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import logging
import random
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import IterableDataset

from mmsphere.data.config import DataConfig, SourceConfig
from mmsphere.data.batch import Batch
from mmsphere.data.batching import POSITIVES, Tokenizer, collate_train
from mmsphere.data.cached import cached_reader
from mmsphere.data.feature_files import FeatureCache
from mmsphere.data.loading import deliver, worker_info
from mmsphere.data.reader import check_shards, read_tar_samples, resampled_shards, shuffled, split_shards, stream_seed
from mmsphere.data.modalities import MODALITY_REGISTRY
from mmsphere.data.samples import DecodeOptions
from mmsphere.data.source_samples import NumberedSample, SampleDecoder, Source, StallGuard, raw_pipeline
from mmsphere.data.stats import SkipCounter, SkipReport, SkipTally
from mmsphere.errors import ConfigError, MmsphereError

logger = logging.getLogger(__name__)


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
    positives: str = "diagonal",
    tokenize_cached: bool = False,
) -> TrainStream:
    """One rank's stream of homogeneous training batches, interleaving ``sources`` by weight.

    Batches: :class:`~mmsphere.data.batch.Batch` (``media``: frames ``[B,T,3,H,W]`` with ``frame_mask``
    or images ``[B,3,H,W]``; ``text [B,L]`` the drawn caption's tokens; ``group_ids`` resolved from
    ``positives``, ``"diagonal"`` or ``"group"``, as ``loss.positives``). ``split`` names the stream
    (``"train"``, ``"meta"``) and enters its seeds, so two streams over the same shards draw differently.
    ``skipped``: where this run's skip counts go (besides the process-wide totals).
    ``feature_caches``: per modality, a feature cache to read instead of decoding; the batches of such
    a source are ``cached``: ``media`` holds the trunk activations (``[B,...]`` images, ``[B,T,...]`` videos)
    and ``text_trunk [B,...]`` replaces the tokens; the same samples and captions otherwise.
    """
    if positives not in POSITIVES:
        raise ConfigError(f"loss.positives={positives!r} must be one of {POSITIVES}")
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
        unknown = MODALITY_REGISTRY.check(source.modality, f"{where}: modality")
        if unknown is not None:
            raise ConfigError(unknown)
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
        resolved.append(Source(name, source.modality, float(source.weight), tuple(urls), options, cache))
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
        positives=positives,
        tokenize_cached=tokenize_cached,
    )


class TrainStream:
    """Iterable of training batches; each pass is one virtual epoch, after which ``epoch`` advances.

    A pass starts at the first batch of ``epoch``, or where :meth:`load_state_dict` put the stream;
    :meth:`state_dict` says where the batches handed out so far leave it.
    """

    def __init__(
        self,
        sources: list[Source],
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
        positives: str = "diagonal",
        tokenize_cached: bool = False,
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
        self.positives = positives  # loss.positives: how the collate resolves group ids
        self.tokenize_cached = tokenize_cached  # cached batches carry their tokens too (model.trainable=last_blocks)
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

    def __iter__(self) -> Iterator[Batch]:
        epoch = self.epoch
        if not self._resume_pending:
            self._batch, self._consumed = 0, self._nothing_consumed()
        self._resume_pending = False
        dataset = _TrainDataset(self, epoch, self._batch, [list(row) for row in self._consumed])
        for index, batch in enumerate(deliver(dataset, self.workers, self.skipped), self._batch):
            self._consumed[index % self.readers], batch.consumed = batch.consumed, None
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

    def __iter__(self) -> Iterator[Batch | SkipReport]:
        stream = self.stream
        process, num_workers = worker_info()
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
                    positives=stream.positives,
                    tokenize_cached=stream.tokenize_cached,
                )
                batch.consumed = list(consumed)  # taken off again by TrainStream.__iter__
                yield batch
        yield SkipReport(counter.drain())

    def _samples(
        self, index: int, worker: int, num_workers: int, counter: SkipCounter, skip: int = 0
    ) -> Iterator[NumberedSample]:
        """An endless stream of decoded samples of one source for this rank and worker.

        Raw samples are numbered 1, 2, ... in the order the shuffle buffer gives them; the first
        ``skip`` are passed over without being decoded (they were used before a resume).
        """
        stream, source = self.stream, self.stream.sources[index]
        ids = (stream.seed, stream.split, self.epoch, stream.rank, worker, index)
        shuffle_rng = random.Random(stream_seed(*ids, "shuffle"))
        decoder = SampleDecoder(source, counter, stream_seed(*ids, "decode"), stream_seed(*ids, "captions"))
        reader = cached_reader(source.cache) if source.cache is not None else read_tar_samples
        if stream.resampled:
            guard = StallGuard(source, len(source.urls), stream.shuffle_buffer, counter)
            shards = functools.partial(resampled_shards, source.urls, stream_seed(*ids, "shards"))
            raws = raw_pipeline(shards, counter, stream.shuffle_buffer, shuffle_rng, guard, reader)
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
            for raw in raw_pipeline(mine, counter, stream.shuffle_buffer, shuffle_rng, reader=reader):
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



def _check_tokenizer(tokenizer: Tokenizer) -> None:
    if not callable(tokenizer):
        raise TypeError(f"tokenizer must be callable list[str] -> LongTensor[N, L], got {type(tokenizer).__name__}")
    probe = tokenizer(["a photo", "a video"])
    if not isinstance(probe, torch.Tensor) or probe.ndim != 2 or probe.shape[0] != 2:
        shape = tuple(probe.shape) if isinstance(probe, torch.Tensor) else type(probe).__name__
        raise TypeError(f"tokenizer must return a tensor [N, L] for N captions, got {shape}")
