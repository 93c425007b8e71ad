"""Benchmark of retrieval scoring: ``python scripts/benchmark.py eval [options]``.

1. ``retrieval_metrics`` (comparison counting, chunked) against a naive full-argsort ranking on the
   same ``N × N`` similarity matrix, interleaved repetitions, for each ``--sizes`` N.
2. faiss ``IndexFlatIP`` top-k over a large gallery against a chunked torch ``matmul + topk``.

Peak memory is the growth of the process's peak resident set (Linux ``VmHWM``, reset through
``/proc/self/clear_refs`` before each call) over its resident set just before the call, so it
counts torch, numpy and faiss allocations alike (tracemalloc would miss torch's and faiss's).
Linux and glibc only.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from mmsphere.eval import retrieval_metrics, retrieval_ranks, topk_search

MIB = 1024 * 1024


def main(argv: list[str]) -> int:
    """Run the benchmark and print a markdown table of the figures."""
    _allocate_large_blocks_with_mmap()
    parser = argparse.ArgumentParser(prog="benchmark.py eval", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 30000])
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repetitions per size")
    parser.add_argument("--dim", type=int, default=256, help="feature dimension of the synthetic embeddings")
    parser.add_argument("--gallery", type=int, default=1_000_000, help="gallery size for the top-k benchmark")
    parser.add_argument("--queries", type=int, default=1000, help="queries for the top-k benchmark")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--skip-topk", action="store_true")
    args = parser.parse_args(argv)

    print(f"machine: {platform.machine()} {platform.processor() or ''} nproc={os.cpu_count()} "
          f"torch={torch.__version__} threads={torch.get_num_threads()}")
    print("\n| N | retrieval_metrics (s) | full argsort (s) | speed-up | peak RSS growth: ours / argsort (MiB) | ours vs argsort ranks |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes:
        print(_ranking_row(size, args.dim, args.repeats), flush=True)
    if not args.skip_topk:
        print(f"\n| gallery × D | queries | k | faiss IndexFlatIP, default threads (s) | faiss, 1 thread (s) | "
              "torch matmul+topk (s) | speed-up vs torch: default / 1 thread | peak RSS growth: faiss / faiss 1t / torch (MiB) "
              "| same top-k indices |")
        print("|---|---|---|---|---|---|---|---|---|")
        print(_topk_row(args.gallery, args.queries, args.dim, args.k, args.repeats), flush=True)
    return 0


def naive_ranks(sim: torch.Tensor) -> torch.Tensor:
    """The usual recipe: sort every row in full and find where the diagonal item landed."""
    order = torch.argsort(sim, dim=1, descending=True)
    return torch.nonzero(order == torch.arange(sim.shape[0])[:, None])[:, 1]


def _ranking_row(size: int, dim: int, repeats: int) -> str:
    generator = torch.Generator().manual_seed(size)
    queries = torch.nn.functional.normalize(torch.randn(size, dim, generator=generator), dim=1)
    gallery = torch.nn.functional.normalize(queries + 0.9 * torch.randn(size, dim, generator=generator), dim=1)
    sim = queries @ gallery.T
    del queries, gallery
    # torch.sort keeps the sorted values (4 B) and indices (8 B) of every score, plus the 1-byte
    # comparison mask: refuse the naive run where it would push the machine into swap or OOM
    naive_bytes = 13 * size * size
    naive_fits = naive_bytes < 0.8 * _available_bytes()

    ours_times, naive_times, ours_memory, naive_memory = [], [], [], []
    naive_result = None
    for repeat in range(repeats):
        # alternate which one runs first, so drifting machine load hits both alike
        order = ("ours", "naive") if repeat % 2 == 0 else ("naive", "ours")
        for which in order:
            if which == "ours":
                seconds, memory, _ = _measure(lambda: retrieval_metrics(sim))
                ours_times.append(seconds)
                ours_memory.append(memory)
            elif naive_fits and (repeat == 0 or size <= 10000):
                # one naive run at the largest size: it takes minutes and ~12 GB
                seconds, memory, naive_result = _measure(lambda: naive_ranks(sim))
                naive_times.append(seconds)
                naive_memory.append(memory)
    ours = statistics.median(ours_times)
    if not naive_times:
        return (f"| {size:,} | {ours:.3f} | not run (needs ~{naive_bytes / 2**30:.1f} GiB, "
                f"{_available_bytes() / 2**30:.1f} GiB available) | – | {max(ours_memory):.0f} / – | – |")
    naive = statistics.median(naive_times)
    same = _agreement(sim, retrieval_ranks(sim), naive_result.numpy())
    return (f"| {size:,} | {ours:.3f} (n={len(ours_times)}) | {naive:.3f} (n={len(naive_times)}) | "
            f"{naive / ours:.1f}× | {max(ours_memory):.0f} / {max(naive_memory):.0f} | {same} |")


def _agreement(sim: torch.Tensor, ours: np.ndarray, naive: np.ndarray) -> str:
    """Equal ranks, or differences that are all ties (which the naive sort places arbitrarily)."""
    differing = np.flatnonzero(ours != naive)
    if differing.size == 0:
        return "identical ranks"
    rows = torch.from_numpy(differing)
    truth = sim[rows, rows]
    tied = (sim[rows] == truth[:, None]).sum(dim=1).numpy() - 1  # other items tied with the ground truth
    explained = bool(np.all((naive[differing] <= ours[differing]) & (ours[differing] - naive[differing] <= tied)))
    verdict = "all explained by ties" if explained else "NOT explained by ties"
    return f"ranks differ on {differing.size} queries by {int((ours - naive).sum())} in total, {verdict}"


def _topk_row(gallery_size: int, num_queries: int, dim: int, k: int, repeats: int) -> str:
    rng = np.random.default_rng(0)
    gallery = rng.standard_normal((gallery_size, dim), dtype=np.float32)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    queries = gallery[rng.choice(gallery_size, num_queries, replace=False)] + 0.5 * rng.standard_normal(
        (num_queries, dim), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    gallery_tensor, query_tensor = torch.from_numpy(gallery), torch.from_numpy(queries)

    def torch_topk() -> tuple[torch.Tensor, torch.Tensor]:
        # same O(chunk × G) budget as the retrieval scoring: queries in chunks against the gallery
        chunk = max(1, (1 << 24) // gallery_size)
        scores, indices = [], []
        for start in range(0, num_queries, chunk):
            top = torch.topk(query_tensor[start : start + chunk] @ gallery_tensor.T, k, dim=1)
            scores.append(top.values)
            indices.append(top.indices)
        return torch.cat(scores), torch.cat(indices)

    contenders = {
        "faiss": lambda: topk_search(queries, gallery, k),
        "faiss_1_thread": lambda: topk_search(queries, gallery, k, threads=1),
        "torch": torch_topk,
    }
    times: dict[str, list[float]] = {name: [] for name in contenders}
    memory: dict[str, list[float]] = {name: [] for name in contenders}
    indices: dict[str, np.ndarray] = {}
    names = list(contenders)
    for repeat in range(repeats):
        # rotate the order so drifting machine load hits every contender alike
        for name in names[repeat % 3 :] + names[: repeat % 3]:
            seconds, peak, (_, found) = _measure(contenders[name])
            times[name].append(seconds)
            memory[name].append(peak)
            indices[name] = np.asarray(found)
    agreement = min(float(np.mean(indices[name] == indices["torch"])) for name in names)
    median = {name: statistics.median(values) for name, values in times.items()}
    return (f"| {gallery_size:,} × {dim} | {num_queries:,} | {k} | {median['faiss']:.2f} | "
            f"{median['faiss_1_thread']:.2f} | {median['torch']:.2f} | "
            f"{median['torch'] / median['faiss']:.2f}× / {median['torch'] / median['faiss_1_thread']:.2f}× | "
            f"{max(memory['faiss']):.0f} / {max(memory['faiss_1_thread']):.0f} / {max(memory['torch']):.0f} | "
            f"{100 * agreement:.2f}% |")


def _measure(function: Callable[[], object]) -> tuple[float, float, object]:
    """Wall time (s), peak RSS growth (MiB) and result of one call."""
    gc.collect()
    resident = _status_kib("VmRSS")
    _reset_peak()
    start = time.perf_counter()
    result = function()
    seconds = time.perf_counter() - start
    peak_growth = (_status_kib("VmHWM") - resident) * 1024 / MIB
    return seconds, peak_growth, result


def _allocate_large_blocks_with_mmap() -> None:
    """Fix glibc's mmap threshold at 64 KiB, so every large buffer is mapped and unmapped on its own.

    Otherwise glibc raises the threshold after the first large free and later buffers come from
    heap pages that are already resident, which hides them from the peak-RSS measurement.
    """
    import ctypes

    m_mmap_threshold = -3
    ctypes.CDLL("libc.so.6").mallopt(m_mmap_threshold, 1 << 16)


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _available_bytes() -> int:
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable")
