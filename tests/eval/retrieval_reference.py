"""Loop-based float64 transcriptions of ARCHITECTURE.md, Evaluation conventions: the independent side of the tests."""

from __future__ import annotations

import math
import statistics

import numpy as np


def loop_ranks(sim: np.ndarray, truths: list[list[int]]) -> list[int]:
    """The tie rule word for word: non-ground-truth items scoring >= the best ground-truth score."""
    ranks = []
    for query, items in enumerate(truths):
        best = max(float(sim[query][item]) for item in items)
        ranks.append(sum(1 for item in range(len(sim[query])) if item not in items and float(sim[query][item]) >= best))
    return ranks


def loop_metrics(ranks: list[int]) -> dict[str, float]:
    """R@1/5/10 (percent), MdR and MnR of zero-based ranks."""
    metrics = {f"R@{k}": 100.0 * sum(rank < k for rank in ranks) / len(ranks) for k in (1, 5, 10)}
    metrics["MdR"] = float(statistics.median(rank + 1 for rank in ranks))
    metrics["MnR"] = sum(rank + 1 for rank in ranks) / len(ranks)
    return metrics


def loop_dual_softmax(sim: np.ndarray, temperature: float) -> np.ndarray:
    """``sim[q, g] * exp(sim[q, g] / T) / sum_q' exp(sim[q', g] / T)``, column by column."""
    queries, gallery = sim.shape
    out = np.empty((queries, gallery))
    for item in range(gallery):
        column = [math.exp(float(sim[query, item]) / temperature) for query in range(queries)]
        for query in range(queries):
            out[query, item] = float(sim[query, item]) * column[query] / sum(column)
    return out
