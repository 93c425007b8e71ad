"""OoD detection metrics: AUROC, AUPR-In, AUPR-Out and FPR@95TPR (ARCHITECTURE.md, Evaluation conventions).

Scores follow one convention everywhere: higher = more in-distribution. ``positive`` says which
class the detector is meant to find, which only changes FPR@95 (MCM/CMA report it with ID as the
positive class, OpenOOD v1.5 with OoD). AUROC is symmetric, and AUPR-In/AUPR-Out name their
positive class themselves, so neither depends on ``positive``.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import torch

METRIC_KEYS = ("AUROC", "AUPR_IN", "AUPR_OUT", "FPR95")
RECALL_LEVEL = Fraction(95, 100)
CONVENTIONS = {
    "id": (
        "higher score = more in-distribution; ID is the positive class (MCM/CMA convention): "
        "FPR95 = fraction of OoD samples scoring >= the largest threshold that keeps >= 95% of ID samples; "
        "AUPR_IN = average precision with ID positive, AUPR_OUT = with OoD positive on negated scores"
    ),
    "ood": (
        "higher score = more in-distribution; OoD is the positive class (OpenOOD v1.5 convention): "
        "FPR95 = fraction of ID samples flagged as OoD at the threshold that detects >= 95% of OoD samples; "
        "AUPR_IN = average precision with ID positive, AUPR_OUT = with OoD positive on negated scores"
    ),
}


def ood_metrics(id_scores: np.ndarray | torch.Tensor, ood_scores: np.ndarray | torch.Tensor,
                positive: str = "id") -> dict[str, float]:
    """AUROC, AUPR_IN, AUPR_OUT and FPR95 (fractions in [0, 1]) for one ID/OoD pair of score sets.

    ``positive="id"`` (default, MCM/CMA) or ``"ood"`` (OpenOOD v1.5) sets the FPR@95 convention.
    """
    id_scores = checked_scores(id_scores, "id_scores")
    ood_scores = checked_scores(ood_scores, "ood_scores")
    if positive not in CONVENTIONS:
        raise ValueError(f"positive={positive!r} must be 'id' or 'ood'")
    if positive == "id":
        fpr95 = false_positive_rate_at_recall(id_scores, ood_scores)
    else:
        fpr95 = false_positive_rate_at_recall(-ood_scores, -id_scores)
    return {
        "AUROC": auroc(id_scores, ood_scores),
        "AUPR_IN": average_precision(id_scores, ood_scores),
        "AUPR_OUT": average_precision(-ood_scores, -id_scores),
        "FPR95": fpr95,
    }


def checked_scores(scores: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    """A finite, non-empty 1-D float64 array, or a ``ValueError`` naming ``name``."""
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().cpu().double().numpy()
    scores = np.asarray(scores)
    if scores.dtype.kind not in "fiu":
        raise ValueError(f"{name} must be numeric, got dtype {scores.dtype}")
    scores = scores.astype(np.float64)
    if scores.ndim != 1 or scores.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array, got shape {scores.shape}")
    bad = ~np.isfinite(scores)
    if bad.any():
        raise ValueError(f"{name} has {int(bad.sum())} non-finite values (first at index {int(np.argmax(bad))})")
    return scores


def auroc(positive_scores: np.ndarray, negative_scores: np.ndarray) -> float:
    """Area under the ROC curve = P(positive > negative) + ½·P(tie) (Mann–Whitney U)."""
    combined = np.concatenate([positive_scores, negative_scores])
    values, inverse, counts = np.unique(combined, return_inverse=True, return_counts=True)
    # tied scores share the mean of the 1-based ranks they span
    mean_rank = np.cumsum(counts) - (counts - 1) / 2.0
    positive_rank_sum = mean_rank[inverse[: positive_scores.size]].sum()
    num_pos, num_neg = positive_scores.size, negative_scores.size
    return float((positive_rank_sum - num_pos * (num_pos + 1) / 2.0) / (num_pos * num_neg))


def _counts_at_or_above(positive_scores: np.ndarray, negative_scores: np.ndarray) -> tuple[np.ndarray, ...]:
    """Distinct thresholds (descending) and the positives/negatives scoring ``>=`` each."""
    thresholds = np.unique(np.concatenate([positive_scores, negative_scores]))[::-1]
    positive_sorted = np.sort(positive_scores)
    negative_sorted = np.sort(negative_scores)
    true_positives = positive_sorted.size - np.searchsorted(positive_sorted, thresholds, side="left")
    false_positives = negative_sorted.size - np.searchsorted(negative_sorted, thresholds, side="left")
    return thresholds, true_positives, false_positives


def average_precision(positive_scores: np.ndarray, negative_scores: np.ndarray) -> float:
    """Average precision ``Σ_n (R_n − R_{n−1})·P_n`` over the distinct thresholds (scikit-learn's definition)."""
    _, true_positives, false_positives = _counts_at_or_above(positive_scores, negative_scores)
    precision = true_positives / (true_positives + false_positives)
    recall = true_positives / positive_scores.size
    recall_steps = np.diff(np.concatenate([[0.0], recall]))
    return float(np.sum(recall_steps * precision))


def false_positive_rate_at_recall(positive_scores: np.ndarray, negative_scores: np.ndarray,
                                  recall: Fraction = RECALL_LEVEL) -> float:
    """Fraction of negatives scoring ``>=`` the largest threshold that keeps ``>= recall`` of the positives."""
    # the kept fraction only changes at positive scores, so the threshold is the k-th largest
    # positive score, k the smallest count with k/n >= recall (rational, so the boundary is exact)
    count = positive_scores.size
    needed = math.ceil(Fraction(recall) * count)
    threshold = np.sort(positive_scores)[::-1][needed - 1]
    return float(np.mean(negative_scores >= threshold))


def roc_curve(id_scores: np.ndarray | torch.Tensor, ood_scores: np.ndarray | torch.Tensor,
              positive: str = "id") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC points ``(false_positive_rate, true_positive_rate, thresholds)``, starting at (0, 0).

    With ``positive="ood"`` the positives are the OoD samples and the thresholds apply to the
    negated scores.
    """
    id_scores = checked_scores(id_scores, "id_scores")
    ood_scores = checked_scores(ood_scores, "ood_scores")
    if positive not in CONVENTIONS:
        raise ValueError(f"positive={positive!r} must be 'id' or 'ood'")
    positives, negatives = (id_scores, ood_scores) if positive == "id" else (-ood_scores, -id_scores)
    thresholds, true_positives, false_positives = _counts_at_or_above(positives, negatives)
    false_positive_rate = np.concatenate([[0.0], false_positives / negatives.size])
    true_positive_rate = np.concatenate([[0.0], true_positives / positives.size])
    return false_positive_rate, true_positive_rate, np.concatenate([[np.inf], thresholds])


def mean_metrics(per_set: dict[str, dict[str, float]]) -> dict[str, float]:
    """The mean of each metric over the OoD sets (the "mean" row of the published tables)."""
    if not per_set:
        raise ValueError("mean_metrics needs at least one OoD set")
    return {key: float(np.mean([metrics[key] for metrics in per_set.values()])) for key in METRIC_KEYS}
