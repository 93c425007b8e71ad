"""The hyperspherical objective family as pure functions (ARCHITECTURE.md, Objective).

Every function takes L2-normalised feature rows ``[B, D]`` and returns a tensor; nothing here holds
state, reads a config or moves data between devices, so each one can be checked against a direct
transcription of its formula.

One definition per loss: :func:`clip_loss`, :func:`angular_margin_loss`, :func:`siglip_loss`,
:func:`m2mix_loss` and :func:`cma_regularizer` build their registered objective term
(:mod:`mmsphere.losses.terms`) from their arguments and evaluate it on the whole batch
(:func:`~mmsphere.losses.terms.evaluate_on_batch`), so function and term are one code path;
:func:`calibrated_uniformity` (one modality against a given calibration matrix) is the core of the
``calibrated_uniformity`` term. :func:`slerp`, :func:`alignment` and :func:`uniformity` are the
geometric building blocks of Wang & Isola, not objective terms.

Precision: inputs of any float dtype are accepted. Half-precision inputs (fp16, bf16) are upcast
and the arithmetic runs in fp32, because logits at ``logit_scale = 100`` and cosines near ±1 need
more than 8–11 mantissa bits; losses come back in that compute dtype (fp32 for fp16/bf16/fp32
inputs, fp64 for fp64 inputs). :func:`slerp` returns features, so it returns the input dtype.
Inside an autocast region the matmuls would still run in half precision; :class:`Objective
<mmsphere.losses.objective.Objective>` switches autocast off around them.

``logit_scale`` is always the multiplier ``s`` (``exp`` of the learned log-scale), a float or a
one-element tensor; gradients flow into it when it is a tensor that requires them. The same holds
for the additive ``logit_bias`` of :func:`siglip_loss`.

Multi-positive batches (``loss.positives: group``): :func:`clip_loss`,
:func:`angular_margin_loss` and :func:`siglip_loss` take an optional ``group_ids: [B]`` integer
tensor; every pair ``(i, j)`` with ``g_i = g_j`` is a positive. ``group_ids=None`` keeps the
single-positive code path, and all-distinct ids give the same values as ``None``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from mmsphere.losses.numerics import (REDUCTIONS, _arccos_eps, _as_scale, _check_features, _check_pair,  # noqa: F401
                                      _check_temperature, _positive_mask, _reduce, _upcast)
from mmsphere.losses.terms import (AngularMargin, CalibratedUniformity, Clip, CrossModalAlignment, M2Mix, Rows, Siglip,
                                   Term, TermOptions, evaluate_on_batch)

__all__ = [
    "clip_loss",
    "angular_margin_loss",
    "siglip_loss",
    "slerp",
    "m2mix_loss",
    "alignment",
    "uniformity",
    "calibrated_uniformity",
    "cma_regularizer",
]


def clip_loss(
    img: Tensor, txt: Tensor, logit_scale: float | Tensor, reduction: str = "mean", *, group_ids: Tensor | None = None
) -> Tensor:
    """Symmetric InfoNCE of CLIP (Radford et al. 2021); ``"mean"`` equals ``open_clip.ClipLoss``.

    img, txt: [B, D] unit-norm. Per-sample ``ℓ_i = ½[CE(L)_i + CE(Lᵀ)_i]`` with ``L = s·img·txtᵀ``.
    group_ids: optional [B] integers; row i's target is then uniform over ``P(i) = {j : g_j = g_i}``
    (UniCL, CVPR 2022): ``CE_P(L)_i = −(1/|P(i)|) Σ_{p∈P(i)} log softmax(L_i)_p``.
    """
    return _reduce(evaluate_on_batch(Clip(Clip.Options()), img, txt, logit_scale, group_ids=group_ids), reduction)


def angular_margin_loss(
    img: Tensor,
    txt: Tensor,
    logit_scale: float | Tensor,
    margin: float,
    reduction: str = "mean",
    *,
    group_ids: Tensor | None = None,
) -> Tensor:
    """Subtractive angular margin contrastive loss (MAMA, ECCV 2024).

    img, txt: [B, D] unit-norm. The positive logits become ``s·cos(θ_ii − m)`` with
    ``θ_ii = arccos(clamp(⟨img_i, txt_i⟩, −1+ε, 1−ε))``; negatives stay ``s·⟨img_i, txt_j⟩``.
    ε is 1e-6 for fp32/fp64 inputs and 1e-3 for fp16/bf16 inputs, so gradients stay finite for
    identical pairs. ``margin=0`` is :func:`clip_loss` (up to the clamp). group_ids: optional [B]
    integers; every pair with ``g_i = g_j`` gets the margin on its own cosine and the targets are
    as in :func:`clip_loss`.
    """
    term = AngularMargin(_options(AngularMargin, margin=margin))
    return _reduce(evaluate_on_batch(term, img, txt, logit_scale, group_ids=group_ids), reduction)


def siglip_loss(
    img: Tensor,
    txt: Tensor,
    logit_scale: float | Tensor,
    logit_bias: float | Tensor,
    margin: float = 0.0,
    reduction: str = "mean",
    *,
    group_ids: Tensor | None = None,
) -> Tensor:
    """Pairwise sigmoid loss of SigLIP (Zhai et al., ICCV 2023) with MAMA's angular margin on positives.

    img, txt: [B, D] unit-norm. ``L_ij = s⟨img_i, txt_j⟩ + b``; positives ``L_ii = s·cos(θ_ii − m) + b``
    with θ as in :func:`angular_margin_loss`; ``z_ij = +1`` on positives, −1 otherwise. Per-sample
    ``ℓ_i = −½[Σ_j log σ(z_ij L_ij) + Σ_j log σ(z_ji L_ji)]``, so ``"mean"`` is
    ``−(1/B) Σ_ij log σ(z_ij L_ij)``, which at ``margin=0`` equals
    ``open_clip.loss.SigLipLoss()(img, txt, s, b)``. logit_bias: b, a float or a one-element tensor.
    group_ids: optional [B] integers; every pair with ``g_i = g_j`` is a positive (``z = +1``, margin
    on its own cosine).
    """
    term = Siglip(_options(Siglip, margin=margin))
    return _reduce(evaluate_on_batch(term, img, txt, logit_scale, logit_bias=logit_bias, group_ids=group_ids),
                   reduction)


def slerp(a: Tensor, b: Tensor, lam: float | Tensor) -> Tensor:
    """Geodesic interpolation of unit rows: ``sin(λθ)/sinθ·a + sin((1−λ)θ)/sinθ·b``, ``θ = ∠(a, b)``.

    a, b: [B, D] unit-norm; lam: a float or a tensor of shape [B] (one λ per row). ``lam=1`` gives
    ``a`` and ``lam=0`` gives ``b`` exactly; every other output row has unit norm. The point is
    computed as ``cos(λθ)·b + sin(λθ)·u``, u the unit tangent at b towards a, which equals the formula
    above but stays accurate where ``sinθ`` is tiny. Nearly identical rows use the series of
    ``sin(λθ)/sinθ``, so gradients stay finite at ``a = b``. Antipodal rows (and rows so nearly
    antipodal that the tangent towards a is lost in rounding) have no unique geodesic; there the
    great circle through b and the coordinate axis ``e_k``, ``k = argmin_k |b_k|`` (first such k), is
    taken: ``u = normalise(e_k − b_k·b)``. For exact antipodes (``a = −b``) the rule is symmetric in a
    and b, so ``slerp(a, b, λ) = slerp(b, a, 1 − λ)`` still holds. Returns [B, D] in the input dtype.
    """
    _check_pair(a, b, names=("a", "b"))
    output_dtype = a.dtype
    a, b = _upcast(a), _upcast(b)
    lam = _as_lam(lam, a)
    endpoint = lam[:, None] if lam.dim() == 1 else lam
    if a.shape[1] == 1:
        # S⁰ = {−1, 1} has no path between its two points (every pair is identical or antipodal):
        # the endpoint nearer in λ, a at λ = ½
        return torch.where(endpoint >= 0.5, a, b).to(output_dtype)
    # the angle and the tangent come from the directions only, so rows that are off the sphere by
    # rounding (half-precision features) still give an exact antipode for a = −b
    unit_a, unit_b = F.normalize(a, dim=1), F.normalize(b, dim=1)
    cosine = (unit_a * unit_b).sum(dim=1)
    tangent = unit_a - cosine[:, None] * unit_b
    # a second Gram–Schmidt pass: when the tangent is tiny, one pass leaves a component along b of
    # the order of rounding, which would be amplified when the tangent is normalised
    tangent = tangent - (tangent * unit_b).sum(dim=1, keepdim=True) * unit_b
    sine = torch.linalg.vector_norm(tangent, dim=1)
    theta = torch.atan2(sine, cosine)  # accurate over [0, π], unlike arccos near ±1
    near, far = (1e-2, 1e-4) if cosine.dtype == torch.float32 else (1e-4, 1e-8)
    is_close = theta < near
    # Below `far` (about the square root of the unit roundoff) fewer than half the digits of the
    # tangent rise above rounding, so its direction says little about a; every great circle through
    # b passes within that angle of a, so a fixed choice costs no more than the rounding already did.
    is_antipodal = (sine < far) & (cosine < 0)
    # Each branch is evaluated (torch.where), so each gets inputs on which it is finite and has
    # finite gradients; otherwise a NaN in the unused branch would leak into the backward pass.
    safe_sine = torch.where(is_close | is_antipodal, torch.ones_like(sine), sine)
    # sin(λθ)/sinθ = λ[1 + (1 − λ²)θ²/6 + O(θ⁴)]; the next term is below the unit roundoff at `near`
    series = lam * (1 + (1 - lam**2) * theta**2 / 6)
    along_tangent = torch.where(is_close, series, torch.sin(lam * theta) / safe_sine)
    along_tangent = torch.where(is_antipodal, torch.zeros_like(along_tangent), along_tangent)
    along_fallback = torch.where(is_antipodal, torch.sin(lam * theta), torch.zeros_like(theta))
    point = (torch.cos(lam * theta)[:, None] * unit_b + along_tangent[:, None] * tangent
             + along_fallback[:, None] * _fixed_tangent(unit_b))
    point = F.normalize(point, dim=1)
    point = torch.where(endpoint == 1, a, torch.where(endpoint == 0, b, point))
    return point.to(output_dtype)


def m2mix_loss(
    img: Tensor, txt: Tensor, lam: float | Tensor, tau_mix: float = 0.07, reduction: str = "mean"
) -> Tensor:
    """Geodesic multimodal mixup hard negatives (m²-mix, Oh et al., NeurIPS 2023).

    img, txt: [B, D] unit-norm. With ``n_j = slerp(img_j, txt_j, λ)`` the off-diagonal negatives
    become ``⟨img_i, n_j⟩`` (image side) and ``⟨txt_i, n_j⟩`` (text side), the positives stay
    ``⟨img_i, txt_i⟩``; per-sample ``½[CE(P_img/τ)_i + CE(P_txt/τ)_i]``.
    """
    _check_pair(img, txt)
    if not tau_mix > 0:
        raise ValueError(f"tau_mix={tau_mix} must be > 0")
    term = M2Mix(_options(M2Mix, tau=tau_mix))
    return _reduce(evaluate_on_batch(term, img, txt, 1.0, draw=_as_lam(lam, _upcast(img))), reduction)


def alignment(x: Tensor, y: Tensor, alpha: float = 2.0, reduction: str = "mean") -> Tensor:
    """Alignment ``mean_i ‖x_i − y_i‖^α`` (Wang & Isola, ICML 2020).

    x, y: [B, D]. ``reduction="none"`` gives the per-pair distances ``[B]``.
    """
    _check_pair(x, y, names=("x", "y"))
    if not alpha > 0:
        raise ValueError(f"alpha={alpha} must be > 0")
    x, y = _upcast(x), _upcast(y)
    # vector_norm's gradient at a zero difference is defined as 0, so identical pairs stay finite
    return _reduce(torch.linalg.vector_norm(x - y, dim=1).pow(alpha), reduction)


def uniformity(x: Tensor, t: float = 2.0) -> Tensor:
    """Uniformity ``log mean_{i<j} exp(−t‖x_i − x_j‖²)`` (Wang & Isola, ICML 2020).

    x: [B, D] with B >= 2. Returns a scalar.
    """
    _check_features(x, "x")
    _check_temperature(t)
    x = _upcast(x)
    return _log_mean_upper(-t * _squared_distances(x))


def calibrated_uniformity(x: Tensor, sim: Tensor, t: float = 2.0) -> Tensor:
    """Calibrated uniformity (CM³, 2025): ``log mean_{i<j} exp(−t(‖x_i − x_j‖² − 2 + 2·sim_ij))``.

    x: [B, D] unit-norm with B >= 2; sim: [B, B] calibration similarities (only ``i < j`` is read).
    Higher ``sim_ij`` weakens the repulsion of i and j; ``sim ≡ 1`` gives :func:`uniformity`.
    """
    _check_features(x, "x")
    _check_temperature(t)
    if not isinstance(sim, Tensor) or sim.dim() != 2 or sim.shape != (x.shape[0], x.shape[0]):
        shape = list(sim.shape) if isinstance(sim, Tensor) else type(sim).__name__
        raise ValueError(f"sim must be a tensor of shape [B, B] = {[x.shape[0]] * 2} for x of shape "
                         f"{list(x.shape)}, got {shape}")
    x = _upcast(x)
    # the term's core over ordered pairs, with S mirrored from its upper triangle (the pairs i < j)
    upper = sim.to(x.dtype).triu(diagonal=1)
    base = (-2 * t) * (upper + upper.T)
    base.fill_diagonal_(-math.inf)
    rows = Rows(x, x, x, x, 0, [x.shape[0]], 0, True)
    return CalibratedUniformity.log_mean_exp(base, x @ x.T, 2 * t, None, rows)


def cma_regularizer(img: Tensor, txt: Tensor, logit_scale: float | Tensor, reduction: str = "mean") -> Tensor:
    """Cross-modal alignment regulariser (CMA, CVPR 2025).

    img, txt: [B, D] unit-norm. ``½[mean_k −LSE_j(s⟨img_k, txt_j⟩) + mean_k −LSE_j(s⟨img_j, txt_k⟩)]``;
    ``reduction="none"`` gives ``−½[LSE_j(s⟨img_k, txt_j⟩) + LSE_j(s⟨img_j, txt_k⟩)]`` per sample k.
    """
    return _reduce(evaluate_on_batch(CrossModalAlignment(CrossModalAlignment.Options()), img, txt, logit_scale),
                   reduction)


# --------------------------------------------------------------------------------------------
# helpers of slerp and the uniformity functions


def _options(term_class: type[Term], **fields: object) -> TermOptions:
    """The term's options from a function's arguments; a bad value is a ValueError naming the argument."""
    options = term_class.Options(**fields)
    problems = options.check()
    if problems:
        raise ValueError(problems[0])
    return options


def _fixed_tangent(unit_b: Tensor) -> Tensor:
    """Unit tangent at each row of b towards ``e_k``, ``k = argmin_k |b_k|``: slerp's antipodal choice."""
    axis = unit_b.abs().argmin(dim=1, keepdim=True)  # ties: the first index
    direction = torch.zeros_like(unit_b).scatter_(1, axis, 1.0) - unit_b.gather(1, axis) * unit_b
    # |b_k|² <= 1/D, so the norm is at least sqrt(1 − 1/D) > 0 (slerp handles D = 1 before this)
    return F.normalize(direction, dim=1)


def _squared_distances(x: Tensor) -> Tensor:
    # the Gram form may dip below 0 by rounding for identical rows; harmless, no square root follows
    squared_norms = (x * x).sum(dim=1)
    return squared_norms[:, None] + squared_norms[None, :] - 2 * (x @ x.T)


def _log_mean_upper(exponents: Tensor) -> Tensor:
    """``log mean_{i<j} exp(exponents_ij)`` over the strict upper triangle, stably."""
    size = exponents.shape[0]
    upper = torch.ones(size, size, dtype=torch.bool, device=exponents.device).triu(diagonal=1)
    masked = exponents.masked_fill(~upper, float("-inf"))
    return torch.logsumexp(masked.flatten(), dim=0) - math.log(size * (size - 1) / 2)


def _as_lam(lam: float | Tensor, like: Tensor) -> Tensor:
    if isinstance(lam, (int, float)) and not 0 <= lam <= 1:
        raise ValueError(f"lam={lam} must be in [0, 1]")
    lam = torch.as_tensor(lam, dtype=like.dtype, device=like.device)
    if lam.dim() > 1 or (lam.dim() == 1 and lam.shape[0] != like.shape[0]):
        raise ValueError(f"lam must be a float or a tensor of shape [B] = [{like.shape[0]}], got {list(lam.shape)}")
    return lam


# the margin family of face recognition: each function is its registered term evaluated on the whole batch
from mmsphere.losses.margins import (arcface_loss, cam_softmax_loss, cosface_loss, sface_loss,  # noqa: E402
                                     sphereface2_loss, sphereface_r_loss)

__all__ += ["cosface_loss", "arcface_loss", "sphereface_r_loss", "cam_softmax_loss", "sface_loss", "sphereface2_loss"]
