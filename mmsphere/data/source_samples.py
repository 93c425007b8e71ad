"""Decoding to samples: a source's shards -> raw samples -> numbered, decoded samples with their caption draw.

:func:`raw_pipeline` reads shards (or a feature cache) through the tolerant tar reader and the seeded
shuffle buffer without decoding; :class:`SampleDecoder` decodes the raw sample numbered ``position``
with draws seeded by that number alone (what makes resume exact), and :class:`StallGuard` stops a
resampled source that has long stopped producing samples.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import webdataset as wds

from mmsphere.data.cached import CachedRaw, CachedSample
from mmsphere.data.decode import DecodeError
from mmsphere.data.feature_files import FeatureCache
from mmsphere.data.reader import read_tar_samples
from mmsphere.data.modalities import MODALITY_REGISTRY, media_extensions
from mmsphere.data.samples import DecodeOptions, RawSample, Sample, decode_sample
from mmsphere.data.stats import SkipCounter
from mmsphere.errors import DataError, MmsphereError

# A resampled source that produces nothing for this long is broken, not unlucky: stop with an
# error rather than spin forever.
MAX_FAILED_SAMPLES_IN_A_ROW = 10_000
MIN_EMPTY_SHARDS_IN_A_ROW = 64
SHUFFLE_INITIAL = 100
# A source whose first samples all hold media of the other modality only is declared wrongly (image
# shards given as a video source): say so after this many, not after MAX_FAILED_SAMPLES_IN_A_ROW.
WRONG_MODALITY_SAMPLES = 16


@dataclass(frozen=True)
class Source:
    """One data source as a stream reads it: its name, modality, weight, shard URLs and decode options."""

    name: str
    modality: str
    weight: float
    urls: tuple[str, ...]
    options: DecodeOptions
    cache: FeatureCache | None = None  # read trunk features from here instead of decoding



@dataclass(frozen=True)
class NumberedSample:
    """A decoded sample, its caption for this epoch, and how many raw samples its source had given up to it."""

    position: int
    sample: Sample | CachedSample
    caption: str
    choice: int  # the caption's index among the sample's captions


class SampleDecoder:
    """Decodes the raw sample numbered ``position``, with decode and caption draws seeded by that number.

    Seeding each sample by its number, instead of drawing from one generator, makes its draws
    independent of how many samples before it were decoded, failed or were passed over on resume.
    Raises :class:`DataError` when the first :data:`WRONG_MODALITY_SAMPLES` samples all hold only
    media of the other modality.
    """

    def __init__(self, source: Source, counter: SkipCounter, decode_seed: int, caption_seed: int):
        self.source = source
        self.options = source.options
        self.counter = counter
        self.decode_seed = decode_seed
        self.caption_seed = caption_seed
        self.decoded = 0
        self.failed = 0
        self.wrong_modality: list[RawSample] = []  # while nothing has decoded yet

    def __call__(self, raw: RawSample | CachedRaw, position: int) -> NumberedSample | None:
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
        return NumberedSample(position, sample, sample.captions[choice], choice)

    def modality_error(self) -> DataError | None:
        """The error for a source declared with the wrong modality: every sample tried so far held only the other."""
        if self.decoded or not self.failed or len(self.wrong_modality) < self.failed:
            return None
        declared = self.source.modality
        expected = MODALITY_REGISTRY[declared].extensions
        found = sorted({extension for raw in self.wrong_modality for extension in raw.members
                        if extension in media_extensions()})
        held = [entry.name for entry in MODALITY_REGISTRY.values() if set(entry.extensions) & set(found)]
        other = " or ".join(held)
        first = self.wrong_modality[0]
        return DataError(
            f"data source {self.source.name!r} has modality={declared}, but its first {len(self.wrong_modality)} "
            f"samples hold {', '.join('.' + extension for extension in found)} and none of "
            f"{', '.join('.' + extension for extension in expected)} (e.g. {first.key} in {first.url}): set the "
            f"source's modality to {other}, or point its urls at {declared} shards")


class StallGuard:
    """Stops a resampled source that has long stopped producing samples, instead of hanging."""

    def __init__(self, source: Source, num_shards: int, shuffle_buffer: int, counter: SkipCounter):
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

    def count_decoded(self, samples: Iterable[NumberedSample]) -> Iterator[NumberedSample]:
        for sample in samples:
            self.raw_since_success = 0
            yield sample

    def _fail(self, what: str) -> None:
        raise MmsphereError(
            f"data source {self.source.name!r}: {what} (skipped so far: {dict(self.counter.totals)}); "
            f"check the shards with `mmsphere inspect-shards`"
        )


def raw_pipeline(
    shards: Iterable[str] | Callable[[], Iterator[str]],
    counter: SkipCounter,
    shuffle_buffer: int,
    shuffle_rng: random.Random,
    guard: StallGuard | None = None,
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

