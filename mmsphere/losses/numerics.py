"""Numerical pieces shared by the objective terms: upcasting, the arccos clamp, slerp coefficients, input checks.

Precision: half-precision inputs (fp16, bf16) are upcast and the arithmetic runs in fp32, because
logits at ``logit_scale = 100`` and cosines near ±1 need more than 8–11 mantissa bits; fp64 stays fp64.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

REDUCTIONS = ("mean", "sum", "none")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def row_loss_bias(batch_size: int, lam: float, positive: float, negative: float) -> float:
    """The bias b minimising a one-vs-all row loss ``λ·softplus(−(p + b)) + (1−λ)(B−1)·softplus(n + b)``.

    One positive logit offset ``p`` and ``B − 1`` negatives at ``n`` (the logits of features at their
    initial angle); SigLIP's row (λ = ½, p = n = 0) gives ``−log(B − 1)``.
    """
    if batch_size < 2 or not 0 < lam < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 2 and lam={lam} in (0, 1)")
    # stationary point: λσ(−p−b) = (1−λ)(B−1)σ(n+b); with y = e^(n+b), z = λ/((1−λ)(B−1)), E = e^(p−n):
    # E·y² + (1 − z)·y − z = 0, solved in the form without cancellation
    z = lam / ((1 - lam) * (batch_size - 1))
    growth = math.exp(positive - negative)
    root = math.sqrt((1 - z) ** 2 + 4 * z * growth)
    y = 2 * z / ((1 - z) + root) if z <= 1 else ((z - 1) + root) / (2 * growth)
    return math.log(y) - negative


def _upcast(x: Tensor) -> Tensor:
    return x.to(_compute_dtype(x.dtype))


def _arccos_eps(input_dtype: torch.dtype) -> float:
    """Distance from ±1 at which cosines are clamped before ``arccos``.

    The slope of arccos is ``1/sqrt(1 − c²)``: 707 at ``1 − 1e-6``. Half-precision features carry
    norm errors of order 1e-3, so cosines that close to 1 hold no angle information and would only
    amplify rounding into the gradient; 1e-3 bounds the slope at 22 while keeping the clamp angle
    (0.045 rad) below typical margins.
    """
    return 1e-3 if input_dtype in (torch.float16, torch.bfloat16) else 1e-6


def _margin_cosine(cosine: Tensor, margin: float, input_dtype: torch.dtype) -> Tensor:
    """``cos(arccos(clamp(c)) − m)`` for the positive pairs of the angular margin loss."""
    eps = _arccos_eps(input_dtype)
    return torch.cos(torch.arccos(cosine.clamp(-1 + eps, 1 - eps)) - margin)


def _slerp_weights(cosine: Tensor, lam: Tensor) -> tuple[Tensor, Tensor]:
    """Coefficients ``(w_a, w_b)`` with ``slerp(a, b, λ) = w_a·a + w_b·b``, per row; cosine: [B].

    The composed objective mixes already computed similarity blocks with these. A combination of a
    and b cannot leave their plane, so unlike :func:`slerp` it is not unit-norm at (nearly)
    antipodal rows, where the cosine is clamped and the point lies inside the sphere.
    """
    # Below this gap to 1 the angle is too small for arccos to resolve in the compute dtype; the
    # chord then equals the arc to O(θ³), far below rounding.
    near = 1e-12 if cosine.dtype == torch.float64 else 1e-6
    is_close = cosine > 1 - near
    # Both branches are evaluated (torch.where), so each gets inputs on which it is finite and has
    # finite gradients; otherwise a NaN in the unused branch would leak into the backward pass.
    arc_cosine = torch.where(is_close, torch.zeros_like(cosine), cosine).clamp(min=-1 + near)
    theta = torch.arccos(arc_cosine)
    sin_theta = torch.sin(theta)
    arc_a = torch.sin(lam * theta) / sin_theta
    arc_b = torch.sin((1 - lam) * theta) / sin_theta
    chord_cosine = torch.where(is_close, cosine, torch.ones_like(cosine))
    chord_norm = torch.sqrt(lam**2 + (1 - lam) ** 2 + 2 * lam * (1 - lam) * chord_cosine)
    return torch.where(is_close, lam / chord_norm, arc_a), torch.where(is_close, (1 - lam) / chord_norm, arc_b)


def _positive_mask(group_ids: Tensor | None, like: Tensor) -> Tensor | None:
    """``[B, B]`` boolean mask of ``g_i = g_j`` for group ids ``[B]``; None stays None (one positive per row)."""
    if group_ids is None:
        return None
    if not isinstance(group_ids, Tensor):
        raise ValueError(f"group_ids must be None or an integer tensor of shape [B] = [{like.shape[0]}], "
                         f"got {type(group_ids).__name__}")
    if group_ids.dim() != 1 or group_ids.shape[0] != like.shape[0]:
        raise ValueError(f"group_ids must have shape [B] = [{like.shape[0]}] for features of shape "
                         f"{list(like.shape)}, got {list(group_ids.shape)}")
    if group_ids.is_floating_point() or group_ids.is_complex() or group_ids.dtype == torch.bool:
        raise ValueError(f"group_ids must be an integer tensor, got {group_ids.dtype}")
    if group_ids.device != like.device:
        raise ValueError(f"group_ids must be on the features' device {like.device}, got {group_ids.device}")
    return group_ids[:, None] == group_ids[None, :]


def _reduce(per_sample: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    if reduction == "none":
        return per_sample
    raise ValueError(f"reduction={reduction!r} must be one of {REDUCTIONS}")


def _as_scale(logit_scale: float | Tensor, like: Tensor, name: str = "logit_scale") -> Tensor:
    scale = torch.as_tensor(logit_scale, dtype=like.dtype, device=like.device)
    if scale.numel() != 1:
        raise ValueError(f"{name} must be a float or a one-element tensor, got shape {list(scale.shape)}")
    return scale.reshape(())


def _check_features(x: Tensor, name: str, min_rows: int = 2) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [B, D], got shape {list(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a float tensor, got {x.dtype}")
    if x.shape[0] < min_rows or x.shape[1] == 0:
        raise ValueError(f"{name} must hold at least {min_rows} rows of dimension >= 1, got shape {list(x.shape)}")


def _check_pair(first: Tensor, second: Tensor, names: tuple[str, str] = ("img", "txt")) -> None:
    _check_features(first, names[0], min_rows=1)
    _check_features(second, names[1], min_rows=1)
    if first.shape != second.shape:
        raise ValueError(f"{names[0]} and {names[1]} must have the same shape [B, D], "
                         f"got {list(first.shape)} and {list(second.shape)}")


def _check_margin(margin: float) -> None:
    if not 0 <= margin < math.pi:
        raise ValueError(f"margin={margin} must be in [0, π)")


def _check_temperature(t: float) -> None:
    if not t > 0:
        raise ValueError(f"t={t} must be > 0")
