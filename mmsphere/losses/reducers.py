"""Reducers: per-sample contrastive losses and sample weights in, the contrastive loss out.

The pytorch-metric-learning idea: the objective returns unreduced per-sample losses, and one
place turns them and their weights into the loss, over the GLOBAL batch (ARCHITECTURE.md, Objective):

- ``"mean"``: ``(1/N) Σ_i v_i·ℓ_i``, N the global batch (``v ≡ 1`` without weights);
- ``"sum"``: ``Σ_i v_i·ℓ_i / Σ_i v_i`` (weights normalised to sum 1 over the global batch).

Distributed normalisation: in global mode every rank holds all N per-sample losses and gathers the
weights (with their gradient when they carry one, e.g. into the WeightNet in the meta step); in
``local_loss`` mode rank r holds its own rows, and ``W/N · Σ_local`` averages over ranks to the
global mean, while ``Σ_i v_i`` is all-reduced. Either way the result, after data-parallel gradient
averaging, equals one process on the concatenated batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

import mmsphere.losses.distributed as distributed
from mmsphere.losses.terms import Rows

NORMALIZATIONS = ("mean", "sum")


def reduce_weighted(per_sample: Tensor, rows: Rows, weights: Tensor | None = None, normalize: str = "mean") -> Tensor:
    """The contrastive loss of per-sample losses ``per_sample`` [rows] and this rank's weights [n] (or None)."""
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize={normalize!r} must be one of {NORMALIZATIONS}")
    if weights is None:
        return rows.rank_factor * per_sample.sum() / rows.total
    local = per_sample[rows.local]
    if weights.shape != local.shape:
        raise ValueError(f"sample weights have shape {list(weights.shape)}, expected [n] = {list(local.shape)}")
    weights = weights.to(per_sample.dtype)
    if rows.is_global and len(rows.sizes) > 1:
        gather = distributed.all_gather_with_grad if weights.requires_grad else distributed.all_gather_no_grad
        weights = gather(weights, rows.sizes)
    weighted_sum = rows.rank_factor * (weights * per_sample).sum()
    if normalize == "mean":
        return weighted_sum / rows.total
    total = weights.sum()
    if not rows.is_global:
        total = distributed.all_reduce_with_grad(total) if total.requires_grad else distributed.all_reduce_values(total)
    # all-zero weights give a zero loss rather than 0/0
    return weighted_sum / total.clamp(min=torch.finfo(total.dtype).tiny)
