"""The hyperspherical objective family as pure functions (DESIGN §1).

Every function takes L2-normalised feature rows ``[B, D]`` and returns a tensor; nothing here holds
state, reads a config or moves data between devices, so each one can be checked against a direct
transcription of its formula.

Precision: inputs of any float dtype are accepted. Half-precision inputs (fp16, bf16) are upcast
and the arithmetic runs in fp32, because logits at ``logit_scale = 100`` and cosines near ±1 need
more than 8–11 mantissa bits; losses come back in that compute dtype (fp32 for fp16/bf16/fp32
inputs, fp64 for fp64 inputs). :func:`slerp` returns features, so it returns the input dtype.
Inside an autocast region the matmuls would still run in half precision; :class:`Objective
<mmsphere.losses.objective.Objective>` switches autocast off around them.

``logit_scale`` is always the multiplier ``s`` (``exp`` of the learned log-scale), a float or a
one-element tensor; gradients flow into it when it is a tensor that requires them. The same holds
for the additive ``logit_bias`` of :func:`siglip_loss`.

Multi-positive batches (DESIGN §1, ``loss.positives: group``): :func:`clip_loss`,
:func:`angular_margin_loss` and :func:`siglip_loss` take an optional ``group_ids: [B]`` integer
tensor; every pair ``(i, j)`` with ``g_i = g_j`` is a positive. ``group_ids=None`` keeps the
single-positive code path, and all-distinct ids give the same values as ``None``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

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

REDUCTIONS = ("mean", "sum", "none")


def clip_loss(
    img: Tensor, txt: Tensor, logit_scale: float | Tensor, reduction: str = "mean", *, group_ids: Tensor | None = None
) -> Tensor:
    """Symmetric InfoNCE of CLIP (Radford et al. 2021); ``"mean"`` equals ``open_clip.ClipLoss``.

    img, txt: [B, D] unit-norm. Per-sample ``ℓ_i = ½[CE(L)_i + CE(Lᵀ)_i]`` with ``L = s·img·txtᵀ``.
    group_ids: optional [B] integers; row i's target is then uniform over ``P(i) = {j : g_j = g_i}``
    (UniCL, CVPR 2022): ``CE_P(L)_i = −(1/|P(i)|) Σ_{p∈P(i)} log softmax(L_i)_p``.
    """
    _check_pair(img, txt)
    positives = _positive_mask(group_ids, img)
    img, txt = _upcast(img), _upcast(txt)
    logits = _as_scale(logit_scale, img) * (img @ txt.T)
    if positives is None:
        return _reduce(_symmetric_cross_entropy(logits), reduction)
    return _reduce(_symmetric_multi_positive_cross_entropy(logits, positives), reduction)


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
    _check_pair(img, txt)
    _check_margin(margin)
    positives = _positive_mask(group_ids, img)
    input_dtype = img.dtype
    img, txt = _upcast(img), _upcast(txt)
    scale = _as_scale(logit_scale, img)
    similarity = img @ txt.T
    if positives is None:
        positive = scale * _margin_cosine(similarity.diagonal(), margin, input_dtype)
        logits = torch.diagonal_scatter(scale * similarity, positive)
        return _reduce(_symmetric_cross_entropy(logits), reduction)
    # the margin is evaluated on every entry and kept on the positives; the clamp keeps arccos and
    # its gradient finite on the discarded entries too, so torch.where leaks no NaN backwards
    logits = torch.where(positives, scale * _margin_cosine(similarity, margin, input_dtype), scale * similarity)
    return _reduce(_symmetric_multi_positive_cross_entropy(logits, positives), reduction)


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
    _check_pair(img, txt)
    _check_margin(margin)
    positives = _positive_mask(group_ids, img)
    input_dtype = img.dtype
    img, txt = _upcast(img), _upcast(txt)
    scale = _as_scale(logit_scale, img)
    bias = _as_scale(logit_bias, img, name="logit_bias")
    similarity = img @ txt.T
    logits = scale * similarity
    # margin 0 is plain SigLIP: the arccos clamp would only change cosines beyond 1 − ε and stop
    # their gradient, which SigLIP itself does not do
    if positives is None:
        if margin != 0:
            logits = torch.diagonal_scatter(logits, scale * _margin_cosine(similarity.diagonal(), margin, input_dtype))
        logits = logits + bias
        # z·L with z = −1 off the diagonal; negating is exact, so this is log σ(z_ij L_ij) bit for bit
        signed = torch.diagonal_scatter(-logits, logits.diagonal())
    else:
        if margin != 0:
            logits = torch.where(positives, scale * _margin_cosine(similarity, margin, input_dtype), logits)
        logits = logits + bias
        signed = torch.where(positives, logits, -logits)
    # logsigmoid is stable for large |L| (b = −10 with s up to 100 saturates the negatives)
    log_likelihood = F.logsigmoid(signed)
    per_sample = -0.5 * (log_likelihood.sum(dim=1) + log_likelihood.sum(dim=0))
    return _reduce(per_sample, reduction)


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
    img, txt = _upcast(img), _upcast(txt)
    mixed = slerp(img, txt, lam)
    similarity = img @ txt.T
    eye = torch.eye(img.shape[0], dtype=torch.bool, device=img.device)
    image_side = torch.where(eye, similarity, img @ mixed.T) / tau_mix
    text_side = torch.where(eye, similarity.T, txt @ mixed.T) / tau_mix
    labels = torch.arange(img.shape[0], device=img.device)
    per_sample = 0.5 * (
        F.cross_entropy(image_side, labels, reduction="none") + F.cross_entropy(text_side, labels, reduction="none")
    )
    return _reduce(per_sample, reduction)


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
    return _log_mean_upper(-t * (_squared_distances(x) - 2 + 2 * sim.to(x.dtype)))


def cma_regularizer(img: Tensor, txt: Tensor, logit_scale: float | Tensor, reduction: str = "mean") -> Tensor:
    """Cross-modal alignment regulariser (CMA, CVPR 2025).

    img, txt: [B, D] unit-norm. ``½[mean_k −LSE_j(s⟨img_k, txt_j⟩) + mean_k −LSE_j(s⟨img_j, txt_k⟩)]``;
    ``reduction="none"`` gives ``−½[LSE_j(s⟨img_k, txt_j⟩) + LSE_j(s⟨img_j, txt_k⟩)]`` per sample k.
    """
    _check_pair(img, txt)
    img, txt = _upcast(img), _upcast(txt)
    logits = _as_scale(logit_scale, img) * (img @ txt.T)
    per_sample = -0.5 * (torch.logsumexp(logits, dim=1) + torch.logsumexp(logits, dim=0))
    return _reduce(per_sample, reduction)


# --------------------------------------------------------------------------------------------
# pieces shared with the composed objective (mmsphere.losses.objective)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


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


def _fixed_tangent(unit_b: Tensor) -> Tensor:
    """Unit tangent at each row of b towards ``e_k``, ``k = argmin_k |b_k|``: slerp's antipodal choice."""
    axis = unit_b.abs().argmin(dim=1, keepdim=True)  # ties: the first index
    direction = torch.zeros_like(unit_b).scatter_(1, axis, 1.0) - unit_b.gather(1, axis) * unit_b
    # |b_k|² <= 1/D, so the norm is at least sqrt(1 − 1/D) > 0 (slerp handles D = 1 before this)
    return F.normalize(direction, dim=1)


def _symmetric_cross_entropy(logits: Tensor) -> Tensor:
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels, reduction="none")
                  + F.cross_entropy(logits.T, labels, reduction="none"))


def _symmetric_multi_positive_cross_entropy(logits: Tensor, positives: Tensor) -> Tensor:
    """``½[CE_P(L)_i + CE_P(Lᵀ)_i]`` with ``CE_P(L)_i = −(1/|P(i)|) Σ_{p∈P(i)} log softmax(L_i)_p``.

    positives: [B, B] symmetric boolean mask (it comes from ``g_i = g_j``), so row and column counts
    agree. With one positive per row each term is ``−log softmax(L_i)_i`` computed as
    ``F.cross_entropy`` does (log_softmax along rows of L and of Lᵀ, the only nonzero term summed
    with zeros and divided by 1), so all-distinct ids reproduce :func:`_symmetric_cross_entropy`.
    """
    counts = positives.sum(dim=1).to(logits.dtype)
    # where, not a product with the mask: a −inf log-probability off the positives would give NaN
    rows = torch.where(positives, F.log_softmax(logits, dim=1), 0.0).sum(dim=1) / counts
    columns = torch.where(positives, F.log_softmax(logits.T, dim=1), 0.0).sum(dim=1) / counts
    return 0.5 * (-rows + -columns)


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


def _as_lam(lam: float | Tensor, like: Tensor) -> Tensor:
    if isinstance(lam, (int, float)) and not 0 <= lam <= 1:
        raise ValueError(f"lam={lam} must be in [0, 1]")
    lam = torch.as_tensor(lam, dtype=like.dtype, device=like.device)
    if lam.dim() > 1 or (lam.dim() == 1 and lam.shape[0] != like.shape[0]):
        raise ValueError(f"lam must be a float or a tensor of shape [B] = [{like.shape[0]}], got {list(lam.shape)}")
    return lam


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
