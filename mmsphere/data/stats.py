"""Counters of skipped samples, readable at the end of a run, and rate-limited warnings about them.

A bad sample never stops a run: the stage that meets it records a *reason* on a
:class:`SkipCounter` and moves on. Counts reach the main process through the batches themselves:
every batch carries ``batch.skipped`` (the reasons recorded by its producer since that
producer's previous batch) and each DataLoader worker ends with a :class:`SkipReport` holding what
it recorded after its last batch. The loaders (:func:`mmsphere.data.loading.deliver`) add both into this
module's process-wide totals as they hand batches out, so :func:`skipped_counts` in the training
process sees the skips of every worker, with or without worker processes, and none twice.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Mapping

logger = logging.getLogger(__name__)

# What each reason means; the keys are the only reasons the data package records.
SKIP_REASONS: dict[str, str] = {
    "shard_open_error": "a shard could not be opened (missing file, failed pipe: command)",
    "truncated_tar": "a shard ended inside a member or its tar structure is broken; the rest of it is lost",
    "unknown_member": "a tar member with an extension that is never decoded (e.g. .pth, .pickle, .pyd)",
    "oversized_member": "a tar member larger than the member size limit",
    "non_regular_member": "a tar member that is a link, directory or device rather than a file",
    "duplicate_key": "a sample key seen before in the same shard (the first one is kept)",
    "missing_caption": "a sample without a .txt or .json caption",
    "empty_caption": "a caption that is empty or only whitespace",
    "caption_not_utf8": "a caption that is not valid UTF-8",
    "bad_caption_json": "a .json member that is not an object with 'caption' or 'captions'",
    "missing_media": "a sample without a video or image member",
    "wrong_modality": "a sample whose media is of the other modality than its source",
    "empty_media": "a zero-byte video or image member",
    "no_video_stream": "a video container without a video stream (e.g. audio only)",
    "video_decode_error": "a video that neither decord nor PyAV could decode",
    "image_decode_error": "an image PIL could not decode",
    "image_too_large": "an image over the pixel limit (decompression bomb guard)",
}

_totals: Counter[str] = Counter()
_totals_lock = threading.Lock()


def skipped_counts() -> dict[str, int]:
    """Skips seen by this process so far (including its loader workers'), by reason."""
    with _totals_lock:
        return dict(sorted(_totals.items()))


def reset_skipped_counts() -> None:
    """Forget all counts (e.g. between two evaluations in one process)."""
    with _totals_lock:
        _totals.clear()


def add_skipped(counts: Mapping[str, int]) -> None:
    """Add counts delivered by a producer (a batch's ``"skipped"`` or a :class:`SkipReport`)."""
    with _totals_lock:
        for reason, count in counts.items():
            if count:
                _totals[reason] += int(count)


class SkipTally:
    """Skip counts of one run (a training run's streams, one evaluation), beside the process-wide totals."""

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def add(self, counts: Mapping[str, int]) -> None:
        """Add counts delivered by a producer."""
        with self._lock:
            for reason, count in counts.items():
                if count:
                    self._counts[reason] += int(count)

    def counts(self) -> dict[str, int]:
        """Skips counted so far, by reason."""
        with self._lock:
            return dict(sorted(self._counts.items()))


class SkipReport:
    """The counts a loader worker recorded after its last batch, sent as its final item."""

    def __init__(self, counts: dict[str, int]):
        self.counts = counts

    def __repr__(self) -> str:
        return f"SkipReport({self.counts})"


class SkipCounter:
    """Records skipped items by reason, with warnings limited to a few per reason per interval.

    ``pending`` holds what has not been handed to a batch yet; ``totals`` everything recorded.
    The first ``burst`` occurrences of a reason are logged one by one, later ones at most once
    every ``interval_s`` seconds with the number suppressed in between. Nothing ever sleeps.
    While ``replaying`` (a resumed stream reading again what it read before its checkpoint),
    nothing is counted or logged: those skips were counted, and warned about, the first time.
    """

    def __init__(self, burst: int = 3, interval_s: float = 30.0, clock=time.monotonic):
        self.pending: Counter[str] = Counter()
        self.totals: Counter[str] = Counter()
        self.burst = burst
        self.interval_s = interval_s
        self._clock = clock
        self._last_warning: dict[str, float] = {}
        self._suppressed: Counter[str] = Counter()
        self.replaying = False

    def record(self, reason: str, *, key: str | None = None, url: str | None = None, detail: str = "") -> None:
        """Count one skipped item and maybe warn about it."""
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; known: {', '.join(SKIP_REASONS)}")
        if self.replaying:
            return
        self.pending[reason] += 1
        self.totals[reason] += 1
        if self._should_warn(reason):
            where = " ".join(part for part in (f"key={key}" if key else "", f"shard={url}" if url else "") if part)
            suppressed = self._suppressed.pop(reason, 0)
            more = f" ({suppressed} more since the last warning)" if suppressed else ""
            logger.warning("skipped (%s) %s%s%s", reason, where, f": {detail}" if detail else "", more)
        else:
            self._suppressed[reason] += 1

    def _should_warn(self, reason: str) -> bool:
        now = self._clock()
        last = self._last_warning.get(reason)
        if self.totals[reason] <= self.burst or last is None or now - last >= self.interval_s:
            self._last_warning[reason] = now
            return True
        return False

    def drain(self) -> dict[str, int]:
        """Return and clear the counts not yet handed on."""
        counts = dict(self.pending)
        self.pending.clear()
        return counts
