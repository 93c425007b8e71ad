"""Running a dataset that yields finished batches: in this process or in loader workers, skip counts folded in.

Both streams (:mod:`.mixing`, :mod:`.eval_stream`) hand their datasets to :func:`deliver`: batches come
back in order, every :class:`~mmsphere.data.stats.SkipReport` and every batch's ``skipped`` counts go
into the process-wide totals (and a run's tally), and an error a loader worker raised is raised here
as it was.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mmsphere.data.batch import Batch
from mmsphere.data.stats import SkipReport, SkipTally, add_skipped
from mmsphere.errors import MmsphereError


def deliver(dataset: IterableDataset, workers: int, tally: SkipTally | None = None) -> Iterator[Batch]:
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
        counts = item.counts if isinstance(item, SkipReport) else item.skipped
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


def worker_info() -> tuple[int, int]:
    """This loader worker's index and the number of workers ((0, 1) in the main process)."""
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)
