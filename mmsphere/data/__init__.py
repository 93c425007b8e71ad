"""Streaming image-text and video-text data: shards, decoding, batches, inspection and the demo set.

The data path, top to bottom: :mod:`.sample_list` (read a CSV/JSONL/MSR-VTT list) -> :mod:`.shards`
(check the media, re-encode with :mod:`.reencode` if asked, write tar shards) -> :mod:`.reader` (shard
URLs, tolerant tar reading) -> :mod:`.samples` / :mod:`.decode` / :mod:`.transforms` (one sample
to frames and captions) -> :mod:`.source_samples` (a source's numbered, decoded samples) ->
:mod:`.batching` (the collate: one :class:`Batch`) ; :mod:`.mixing` (training streams: sources mixed by
weight, split by rank and worker) and :mod:`.eval_stream` (evaluation streams), both run by :mod:`.loading`;
:mod:`.cached` and :mod:`.feature_files` read a feature cache instead of the tars; :mod:`.stats` counts what was
skipped, :mod:`.inspect` reports on shards and :mod:`.demo` builds the offline demo set.
"""

from mmsphere.data.batch import Batch
from mmsphere.data.eval_stream import EvalLoader, build_eval_loader
from mmsphere.data.mixing import TrainStream, build_train_stream
from mmsphere.data.sample_list import ListEntry, read_sample_list
from mmsphere.data.shards import ShardSummary, make_shards, write_shards
from mmsphere.data.stats import reset_skipped_counts, skipped_counts

__all__ = [
    "Batch",
    "EvalLoader",
    "ListEntry",
    "ShardSummary",
    "TrainStream",
    "build_eval_loader",
    "build_train_stream",
    "make_shards",
    "read_sample_list",
    "reset_skipped_counts",
    "skipped_counts",
    "write_shards",
]
