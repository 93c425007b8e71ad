"""Retrieval metrics on a query-by-gallery similarity matrix, with the tie rule of ARCHITECTURE.md.

The rank of a query is the number of *non*-ground-truth gallery items scoring at least as high as
its best ground-truth item. Ranks are found by comparison counting, one chunk of query rows at a
time, so the working memory is ``O(chunk × G)`` and nothing is ever sorted.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import torch

logger = logging.getLogger(__name__)

ArrayLike = Union[np.ndarray, torch.Tensor]
QueryToGallery = Union[None, np.ndarray, torch.Tensor, Sequence[int], Sequence[Sequence[int]]]

TIE_RULE = (
    "rank = number of non-ground-truth gallery items scoring >= the best ground-truth score "
    "(ties count against the query); R@K = 100*mean(rank < K), MdR = median(rank + 1), "
    "MnR = mean(rank + 1)"
)
RECALL_LEVELS = (1, 5, 10)
# elements of one chunk of the similarity matrix: 2**24 fp32 values are 64 MB, large enough that
# the per-chunk overhead vanishes next to the comparison pass
DEFAULT_CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class GroundTruth:
    """Ground-truth gallery items of every query, in compressed-row form.

    ``indices[offsets[q]:offsets[q + 1]]`` are the ground-truth gallery items of query ``q``.
    """

    offsets: torch.Tensor  # [Q + 1] int64
    indices: torch.Tensor  # [nnz] int64

    @property
    def num_queries(self) -> int:
        """Number of queries."""
        return self.offsets.numel() - 1


def as_ground_truth(query_to_gallery: QueryToGallery, num_queries: int, num_gallery: int) -> GroundTruth:
    """Validate ``query_to_gallery`` (ARCHITECTURE.md, Evaluation conventions) and turn it into a :class:`GroundTruth`.

    ``None``: query i matches gallery item i (square matrix); a 1-D integer array: one item per
    query; a list of integer sequences (or a 2-D integer array): several items per query.
    """
    if query_to_gallery is None:
        if num_queries != num_gallery:
            raise ValueError(
                f"query_to_gallery=None means query i matches gallery item i and needs a square "
                f"similarity matrix, got [{num_queries}, {num_gallery}]; pass query_to_gallery"
            )
        indices = torch.arange(num_queries, dtype=torch.int64)
        return GroundTruth(torch.arange(num_queries + 1, dtype=torch.int64), indices)

    if isinstance(query_to_gallery, torch.Tensor):
        query_to_gallery = query_to_gallery.detach().cpu().numpy()
    if isinstance(query_to_gallery, np.ndarray):
        if query_to_gallery.dtype.kind not in "iu":
            raise ValueError(f"query_to_gallery must hold integers, got dtype {query_to_gallery.dtype}")
        if query_to_gallery.ndim not in (1, 2):
            raise ValueError(f"query_to_gallery must be 1-D or 2-D, got shape {tuple(query_to_gallery.shape)}")
        per_query_count = 1 if query_to_gallery.ndim == 1 else query_to_gallery.shape[1]
        counts = np.full(query_to_gallery.shape[0], per_query_count, dtype=np.int64)
        flat = query_to_gallery.astype(np.int64).ravel()
    elif isinstance(query_to_gallery, Sequence) and not isinstance(query_to_gallery, (str, bytes)):
        per_query = [_items_of_query(entry, query) for query, entry in enumerate(query_to_gallery)]
        counts = np.array([len(items) for items in per_query], dtype=np.int64)
        flat = np.array([item for items in per_query for item in items], dtype=np.int64)
    else:
        raise ValueError(
            f"query_to_gallery must be None, an integer array or a list of integer sequences, "
            f"got {type(query_to_gallery).__name__}"
        )

    if counts.size != num_queries:
        raise ValueError(
            f"query_to_gallery has {counts.size} entries but the similarity matrix has {num_queries} queries (rows)"
        )
    offsets = np.zeros(num_queries + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(counts)
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        raise ValueError(f"query_to_gallery[{empty[0]}] is empty: every query needs a ground-truth item")
    query_of_item = np.repeat(np.arange(num_queries), counts)
    outside = np.flatnonzero((flat < 0) | (flat >= num_gallery))
    if outside.size:
        item = outside[0]
        raise ValueError(
            f"query_to_gallery[{query_of_item[item]}] names gallery item {flat[item]}, outside [0, {num_gallery})"
        )
    # a ground-truth item listed twice would be subtracted twice from the rank
    order = np.lexsort((flat, query_of_item))
    repeated = np.flatnonzero((np.diff(query_of_item[order]) == 0) & (np.diff(flat[order]) == 0))
    if repeated.size:
        query = query_of_item[order[repeated[0]]]
        items = flat[offsets[query] : offsets[query + 1]].tolist()
        raise ValueError(f"query_to_gallery[{query}]={items} lists a gallery item twice")
    return GroundTruth(torch.from_numpy(offsets), torch.from_numpy(flat))


def _items_of_query(entry: Any, query: int) -> list[int]:
    if isinstance(entry, (numbers.Integral, np.integer)) and not isinstance(entry, bool):
        return [int(entry)]
    if isinstance(entry, torch.Tensor):
        entry = entry.tolist()
    if isinstance(entry, np.ndarray):
        entry = entry.tolist()
    if isinstance(entry, Sequence) and not isinstance(entry, (str, bytes)):
        if all(isinstance(item, (numbers.Integral, np.integer)) and not isinstance(item, bool) for item in entry):
            return [int(item) for item in entry]
    raise ValueError(f"query_to_gallery[{query}]={entry!r} must be a gallery index or a sequence of indices")


def as_similarity(sim: ArrayLike, name: str = "sim") -> torch.Tensor:
    """View a numpy or torch ``[Q, G]`` matrix as a torch tensor without copying it."""
    if isinstance(sim, np.ndarray):
        if sim.dtype.kind != "f":
            raise ValueError(f"{name} must hold floating-point scores, got dtype {sim.dtype}")
        if any(stride < 0 for stride in sim.strides):
            sim = np.ascontiguousarray(sim)
        sim = torch.from_numpy(sim)
    elif not isinstance(sim, torch.Tensor):
        raise ValueError(f"{name} must be a numpy array or a torch tensor, got {type(sim).__name__}")
    if not sim.is_floating_point():
        raise ValueError(f"{name} must hold floating-point scores, got dtype {sim.dtype}")
    if sim.ndim != 2:
        raise ValueError(f"{name} must be a [queries, gallery] matrix, got shape {tuple(sim.shape)}")
    if sim.shape[0] == 0 or sim.shape[1] == 0:
        raise ValueError(f"{name} is empty: shape {tuple(sim.shape)}")
    return sim.detach()


def _scoring_dtype(dtype: torch.dtype) -> torch.dtype:
    # half precision has too few distinct values near 1 to rank a large gallery: score in fp32,
    # keep fp64 where the caller has it (down-casting could create ties that were not there)
    return torch.float64 if dtype == torch.float64 else torch.float32


def default_chunk_size(num_gallery: int) -> int:
    """Rows per chunk so that one chunk holds about ``DEFAULT_CHUNK_ELEMENTS`` scores."""
    return max(1, DEFAULT_CHUNK_ELEMENTS // max(1, num_gallery))


def _resolve_chunk_size(chunk_size: int | None, num_gallery: int) -> int:
    if chunk_size is None:
        return default_chunk_size(num_gallery)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive integer")
    return chunk_size


def retrieval_ranks(
    sim: ArrayLike, query_to_gallery: QueryToGallery = None, *, chunk_size: int | None = None
) -> np.ndarray:
    """Zero-based rank of every query under the tie rule of ARCHITECTURE.md (Evaluation conventions).

    ``sim``: ``[Q, G]`` scores, rows are queries. Returns int64 ``[Q]``: the number of
    non-ground-truth gallery items scoring ``>=`` the query's best ground-truth score.
    """
    sim = as_similarity(sim)
    num_queries, num_gallery = sim.shape
    truth = as_ground_truth(query_to_gallery, num_queries, num_gallery)
    chunk_size = _resolve_chunk_size(chunk_size, num_gallery)
    dtype = _scoring_dtype(sim.dtype)
    offsets, indices = truth.offsets.to(sim.device), truth.indices.to(sim.device)
    ranks = torch.empty(num_queries, dtype=torch.int64)
    for start in range(0, num_queries, chunk_size):
        stop = min(start + chunk_size, num_queries)
        chunk = _finite_chunk(sim, start, stop, dtype)
        ranks[start:stop] = _ranks_of_chunk(chunk, offsets[start : stop + 1] - offsets[start],
                                            indices[offsets[start] : offsets[stop]]).cpu()
    return ranks.numpy()


def _finite_chunk(sim: torch.Tensor, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
    chunk = sim[start:stop].to(dtype)
    # a NaN compares false and would silently improve a rank; a row sum is finite exactly when the
    # row is (barring overflow, which the exact check below sorts out) and costs far less than
    # torch.isfinite on CPU
    if not torch.isfinite(chunk.sum(dim=1)).all():
        finite_rows = torch.isfinite(chunk).all(dim=1)
        if not finite_rows.all():
            row = start + int(torch.nonzero(~finite_rows)[0])
            raise ValueError(f"sim has non-finite scores in query row {row}")
    return chunk


def _ranks_of_chunk(chunk: torch.Tensor, offsets: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    rows = chunk.shape[0]
    counts = offsets[1:] - offsets[:-1]
    row_of_item = torch.repeat_interleave(torch.arange(rows, device=chunk.device), counts)
    truth_scores = chunk[row_of_item, indices]
    best = torch.full((rows,), -torch.inf, dtype=chunk.dtype, device=chunk.device)
    best = best.scatter_reduce(0, row_of_item, truth_scores, reduce="amax")
    # every gallery item at or above the best ground-truth score counts, minus the ground-truth
    # items themselves that reach it (the best one, and any tied with it)
    at_or_above_mask = chunk >= best[:, None]
    if at_or_above_mask.device.type == "cpu":
        # numpy's count_nonzero is about 10x faster than torch's bool reductions on CPU
        at_or_above = torch.from_numpy(np.count_nonzero(at_or_above_mask.numpy(), axis=1).astype(np.int64))
    else:
        at_or_above = torch.count_nonzero(at_or_above_mask, dim=1)
    truths_at_best = torch.zeros(rows, dtype=torch.int64, device=chunk.device)
    truths_at_best.scatter_add_(0, row_of_item, (truth_scores >= best[row_of_item]).long())
    return at_or_above - truths_at_best


def metrics_from_ranks(ranks: ArrayLike) -> dict[str, float]:
    """``R@1``, ``R@5``, ``R@10`` (percent), ``MdR`` and ``MnR`` from zero-based ranks."""
    ranks = np.asarray(ranks.cpu() if isinstance(ranks, torch.Tensor) else ranks, dtype=np.float64)
    if ranks.ndim != 1 or ranks.size == 0:
        raise ValueError(f"ranks must be a non-empty 1-D array, got shape {ranks.shape}")
    metrics = {f"R@{k}": float(100.0 * np.mean(ranks < k)) for k in RECALL_LEVELS}
    metrics["MdR"] = float(np.median(ranks + 1))
    metrics["MnR"] = float(np.mean(ranks + 1))
    return metrics


def retrieval_metrics(
    sim: ArrayLike, query_to_gallery: QueryToGallery = None, *, chunk_size: int | None = None
) -> dict[str, float]:
    """Recall at 1/5/10 (percent), median and mean rank of a ``[Q, G]`` similarity matrix.

    Rows are queries. ``query_to_gallery`` and the tie rule follow ARCHITECTURE.md, Evaluation conventions
    (see ``TIE_RULE``).
    Scoring is chunked over queries (``chunk_size`` rows at a time), so memory is ``O(chunk × G)``.
    """
    return metrics_from_ranks(retrieval_ranks(sim, query_to_gallery, chunk_size=chunk_size))


def dual_softmax(sim: ArrayLike, temperature: float = 0.01, *, chunk_size: int | None = None) -> torch.Tensor:
    """Inference-time dual-softmax re-scoring (DSL; Cheng et al. 2021, arXiv:2109.04290).

    Each score is multiplied by a prior over the queries, ``sim · softmax(sim / T, dim=0)``, so a
    gallery item that matches every query well ("hub") is down-weighted. Returns ``[Q, G]`` fp32
    (fp64 for fp64 input). Uses the whole query set, which is why it is only ever reported as a
    separately labelled extra row.
    """
    sim = as_similarity(sim)
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    num_queries, num_gallery = sim.shape
    chunk_size = _resolve_chunk_size(chunk_size, num_gallery)
    dtype = _scoring_dtype(sim.dtype)
    # pass 1: column-wise log-sum-exp over all queries, accumulated chunk by chunk
    column_lse = torch.full((num_gallery,), -torch.inf, dtype=dtype, device=sim.device)
    for start in range(0, num_queries, chunk_size):
        chunk = _finite_chunk(sim, start, start + chunk_size, dtype)
        column_lse = torch.logaddexp(column_lse, torch.logsumexp(chunk / temperature, dim=0))
    # pass 2: rescale
    out = torch.empty((num_queries, num_gallery), dtype=dtype, device=sim.device)
    for start in range(0, num_queries, chunk_size):
        chunk = sim[start : start + chunk_size].to(dtype)
        out[start : start + chunk_size] = chunk * torch.exp(chunk / temperature - column_lse)
    return out


def topk_search(
    query_features: ArrayLike,
    gallery_features: ArrayLike,
    k: int,
    *,
    approximate: bool = False,
    threads: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` gallery items by inner product for every query, with faiss.

    ``query_features``: ``[Q, D]``, ``gallery_features``: ``[G, D]`` (unit-norm rows make the inner
    product the cosine). Exact (``IndexFlatIP``) unless ``approximate=True`` (HNSW, 32 links).
    ``threads`` sets faiss's OpenMP threads for this call (``None``: faiss's default; on small
    virtual machines one thread can be the fastest, see BENCHMARKS.md).
    Returns ``(scores [Q, k] float32, indices [Q, k] int64)``, best first.
    """
    import faiss  # lazy: a slow import (native library), needed only for top-k search

    queries = _features_for_faiss(query_features, "query_features")
    gallery = _features_for_faiss(gallery_features, "gallery_features")
    if queries.shape[1] != gallery.shape[1]:
        raise ValueError(
            f"query_features are {queries.shape[1]}-dimensional but gallery_features are {gallery.shape[1]}-dimensional"
        )
    if not 1 <= k <= gallery.shape[0]:
        raise ValueError(f"k={k} must be in [1, {gallery.shape[0]}] (the gallery size)")
    dimension = gallery.shape[1]
    if approximate:
        index = faiss.IndexHNSWFlat(dimension, 32, faiss.METRIC_INNER_PRODUCT)
    else:
        index = faiss.IndexFlatIP(dimension)
    if threads is not None and threads < 1:
        raise ValueError(f"threads={threads} must be >= 1")
    previous_threads = faiss.omp_get_max_threads()
    if threads is not None:
        faiss.omp_set_num_threads(threads)
    try:
        index.add(gallery)
        scores, indices = index.search(queries, k)
    finally:
        faiss.omp_set_num_threads(previous_threads)
    return scores, indices.astype(np.int64, copy=False)


def _features_for_faiss(features: ArrayLike, name: str) -> np.ndarray:
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().float().numpy()
    features = np.asarray(features)
    if features.ndim != 2 or features.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty [N, D] matrix, got shape {features.shape}")
    if features.dtype.kind != "f":
        raise ValueError(f"{name} must be floating point, got dtype {features.dtype}")
    features = np.ascontiguousarray(features, dtype=np.float32)
    if not np.isfinite(features).all():
        row = int(np.nonzero(~np.isfinite(features).all(axis=1))[0][0])
        raise ValueError(f"{name} has non-finite values in row {row}")
    return features
