"""The composed training objective: a registry of terms and the :class:`Objective` that sums them.

``loss = w_c·(1/n) Σ v_i·ℓ_i + ω_mix·m2mix + ω_unif·½[cu(img, S) + cu(txt, S)] + λ_cma·cma``
(DESIGN §1, Composition), with ``ℓ`` from ``clip`` or ``angular_margin``, ``v`` the sample weights
(``v ≡ 1`` without meta weighting) and ``w_c`` the config weight of the contrastive term.

Each registered term has a reference definition built from :mod:`mmsphere.losses.functional`.
:class:`Objective` computes the same values from three shared matrices instead of eight matmuls:
``img·txtᵀ`` serves the contrastive term, CMA and the m²-mix positives; the Gram matrices
``img·imgᵀ`` and ``txt·txtᵀ`` serve calibrated uniformity (``‖x_i − x_j‖² = 2 − 2⟨x_i, x_j⟩`` for
unit rows) and, since the mixed embedding ``n_j = slerp(img_j, txt_j, λ)`` and the fused feature
``f_j`` are linear combinations of ``img_j`` and ``txt_j``, also the m²-mix negatives ``⟨x_i, n_j⟩``
and the calibration matrix ``⟨f_i, f_j⟩`` (column/row-scaled sums of the three matrices). Values
and gradients equal the plain functions' (tested), except that calibrated uniformity's gradient
omits the radial component that the encoders' L2 normalisation removes anyway.

Random draws (the m²-mix λ, then one calibration ``p_i`` per sample of the whole global batch) come
from ``numpy.random.default_rng(seed)`` in that order, only for active terms, so every rank draws
the same values.

Under several processes (see :mod:`mmsphere.losses.distributed`) the objective receives the
LOCAL batch and all-gathers features itself. Global mode: every rank evaluates all rows of the
global batch. ``local_loss``: rank r evaluates the rows of its own samples against all columns;
the row-wise terms (contrastive, m²-mix, CMA) are local sums scaled so that their average over
ranks is the global value, and calibrated uniformity, the log of a mean over all pairs, combines
every rank's partial log-sum through a differentiable gather. In both modes the gradients, after
DDP's averaging over ranks, equal those of one process on the concatenated batch (second-order
gradients of the meta step included), and the returned ``loss`` and ``terms`` hold the global
values on every rank, so all ranks take the same decision on a non-finite step.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from mmsphere.config import ConfigError, LossConfig
from mmsphere.losses import distributed
from mmsphere.losses import functional as F
from mmsphere.losses.functional import _as_scale, _margin_cosine, _slerp_weights, _upcast

__all__ = ["Term", "TERMS", "ObjectiveOutput", "Objective", "MixingDraws", "draw_mixing", "calibration_similarity"]


# --------------------------------------------------------------------------------------------
# the registry: reference definitions with one signature, term(img, txt, logit_scale, **extras)


@dataclass(frozen=True)
class Term:
    """A registered objective term: its reference function and recommended weight."""

    name: str
    function: Callable[..., Tensor]
    default_weight: float
    contrastive: bool  # provides the per-sample losses the sample weights act on
    per_sample: bool  # the function accepts reduction="none"
    description: str


def calibration_similarity(
    img: Tensor, txt: Tensor, lam: Tensor | np.ndarray, min_sim: float = 0.0, max_sim: float = 0.8, detach: bool = True
) -> Tensor:
    """CM³ calibration matrix ``S = clamp(f·fᵀ, min_sim, max_sim)`` of the fused features f.

    ``f_i = slerp(img_i, txt_i, p_i)``; img, txt: [B, D] unit-norm; lam: [B], the ``p_i``. Returns [B, B].
    """
    with torch.set_grad_enabled(torch.is_grad_enabled() and not detach):
        fused = F.slerp(_upcast(img), _upcast(txt), lam)
        return (fused @ fused.T).clamp(min_sim, max_sim)


def _clip_term(
    img: Tensor, txt: Tensor, logit_scale: float | Tensor, *, reduction: str = "mean", **_: object
) -> Tensor:
    return F.clip_loss(img, txt, logit_scale, reduction=reduction)


def _angular_margin_term(
    img: Tensor, txt: Tensor, logit_scale: float | Tensor, *, config: LossConfig, reduction: str = "mean", **_: object
) -> Tensor:
    return F.angular_margin_loss(img, txt, logit_scale, config.margin, reduction=reduction)


def _m2mix_term(
    img: Tensor, txt: Tensor, logit_scale: float | Tensor, *, config: LossConfig, mix_lam: float,
    reduction: str = "mean", **_: object,
) -> Tensor:
    return F.m2mix_loss(img, txt, mix_lam, config.tau_mix, reduction=reduction)


def _calibrated_uniformity_term(
    img: Tensor, txt: Tensor, logit_scale: float | Tensor, *, config: LossConfig, calibration_lam: Tensor, **_: object
) -> Tensor:
    calibration = calibration_similarity(img, txt, calibration_lam, config.min_sim, config.max_sim,
                                         detach=config.detach_calibration)
    return 0.5 * (F.calibrated_uniformity(img, calibration, config.uniformity_t)
                  + F.calibrated_uniformity(txt, calibration, config.uniformity_t))


def _cma_term(
    img: Tensor, txt: Tensor, logit_scale: float | Tensor, *, reduction: str = "mean", **_: object
) -> Tensor:
    return F.cma_regularizer(img, txt, logit_scale, reduction=reduction)


TERMS: dict[str, Term] = {
    term.name: term
    for term in (
        Term("clip", _clip_term, 1.0, True, True, "symmetric InfoNCE (CLIP)"),
        Term("angular_margin", _angular_margin_term, 1.0, True, True, "subtractive angular margin (MAMA, ECCV'24)"),
        Term("m2mix", _m2mix_term, 0.1, False, True, "geodesic multimodal mixup negatives (m²-mix, NeurIPS'23)"),
        Term("calibrated_uniformity", _calibrated_uniformity_term, 0.1, False, False,
             "calibrated uniformity on both modalities (CM³, 2025)"),
        Term("cma", _cma_term, 0.001, False, True, "cross-modal alignment regulariser (CMA, CVPR'25)"),
    )
}


# --------------------------------------------------------------------------------------------
# random draws shared by all ranks


@dataclass(frozen=True)
class MixingDraws:
    """The random quantities of one call: the m²-mix λ and the calibration ``p_i`` (None when unused)."""

    mix_lam: float | None
    calibration_lam: np.ndarray | None


def draw_mixing(config: LossConfig, batch_size: int, seed: int | None) -> MixingDraws:
    """λ ~ Beta(m2mix_alpha, m2mix_alpha), then p ~ Beta(calibration_alpha, ·)^batch_size, for active terms only."""
    rng = np.random.default_rng(seed)
    mix_lam = float(rng.beta(config.m2mix_alpha, config.m2mix_alpha)) if config.terms.get("m2mix", 0) > 0 else None
    calibration_lam = None
    if config.terms.get("calibrated_uniformity", 0) > 0:
        calibration_lam = rng.beta(config.calibration_alpha, config.calibration_alpha, size=batch_size)
    return MixingDraws(mix_lam, calibration_lam)


# --------------------------------------------------------------------------------------------
# the objective


@dataclass
class ObjectiveOutput:
    """What one objective call returns: the loss to backpropagate, its terms for logging, per-sample losses."""

    loss: Tensor  # scalar, with graph
    terms: dict[str, Tensor]  # detached values: one per active term (before its config weight) and "total"
    per_sample: Tensor  # [n] contrastive losses of the local samples, with graph


@dataclass
class _Rows:
    """The rows this rank evaluates, against the columns of the whole (global) batch."""

    image: Tensor  # [r, D] row features
    text: Tensor
    all_image: Tensor  # [N, D] column features
    all_text: Tensor
    offset: int  # global index of the first row
    sizes: list[int]  # samples per rank
    rank: int
    is_global: bool  # the rows are the whole batch (global mode or a single process)

    @property
    def total(self) -> int:
        return self.all_image.shape[0]

    @property
    def local(self) -> slice:
        """This rank's samples, as indices into the rows."""
        start = 0 if not self.is_global else sum(self.sizes[:self.rank])
        return slice(start, start + self.sizes[self.rank])

    @property
    def rank_factor(self) -> int:
        """Local mode: a sum over this rank's rows times W/N averages over ranks to the global mean."""
        return 1 if self.is_global else len(self.sizes)


SampleWeights = Tensor | Callable[[Tensor], Tensor] | None


class Objective(nn.Module):
    """The composed objective of a :class:`~mmsphere.config.LossConfig`; no learnable parameters."""

    def __init__(self, config: LossConfig) -> None:
        super().__init__()
        _validate(config)
        self.config = config
        self.term_weights = {name: weight for name, weight in config.terms.items()
                        if TERMS[name].contrastive or weight > 0}
        self.contrastive = next(name for name in self.term_weights if TERMS[name].contrastive)

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: float | Tensor,
        *,
        sample_weights: SampleWeights = None,
        weight_normalize: str = "mean",
        seed: int | None = None,
    ) -> ObjectiveOutput:
        """Evaluate every active term on the (gathered) batch.

        image_features, text_features: [n, D] unit-norm, this process's samples; logit_scale: the
        multiplier s. sample_weights: the weights v_i of this process's samples, either a tensor [n]
        or a callable mapping the detached local per-sample losses [n] to them (how meta weighting
        plugs in, ``V(ℓ.detach(); Θ)``); None means all 1. Weights may carry gradient (the meta
        step's virtual loss differentiates through them into the weight net). They are averaged
        over the global batch (``weight_normalize="mean"``) or normalised to sum 1 over it
        (``"sum"``). seed: of the random draws (None: fresh entropy, shared by all ranks).
        Under torch.distributed every rank must make the same calls: the objective gathers.
        """
        _check_inputs(image_features, text_features, logit_scale, sample_weights, weight_normalize, seed)
        device = image_features.device
        # the pairwise math runs in fp32 or fp64 even inside an autocast region (see functional.py)
        with torch.autocast(device_type=device.type, enabled=False):
            rows = self._gather(image_features, text_features)
            draws = draw_mixing(self.config, rows.total, distributed.shared_seed(seed, device))
            return self._evaluate(rows, _as_scale(logit_scale, rows.image), sample_weights, weight_normalize, draws,
                                  image_features.dtype)

    # ----------------------------------------------------------------------------------------

    def _gather(self, image_features: Tensor, text_features: Tensor) -> _Rows:
        rank, world_size = distributed.world_info()
        local_image, local_text = _upcast(image_features), _upcast(text_features)
        if world_size == 1:
            return _Rows(local_image, local_text, local_image, local_text, 0, [image_features.shape[0]], 0, True)
        sizes = distributed.gather_sizes(image_features.shape[0], image_features.device)
        if self.config.gather_with_grad:
            all_image = distributed.all_gather_with_grad(local_image, sizes)
            all_text = distributed.all_gather_with_grad(local_text, sizes)
        else:
            # Global mode only (enforced in _validate): every rank holds the whole loss, so the local
            # rows' gradient is complete without backward traffic; the factor undoes the averaging
            # over ranks that DDP applies to parameter gradients.
            all_image = distributed.all_gather_local_grad(distributed.scale_gradient(local_image, world_size), sizes)
            all_text = distributed.all_gather_local_grad(distributed.scale_gradient(local_text, world_size), sizes)
        if self.config.local_loss:
            return _Rows(local_image, local_text, all_image, all_text, sum(sizes[:rank]), sizes, rank, False)
        return _Rows(all_image, all_text, all_image, all_text, 0, sizes, rank, True)

    def _contrastive(self, per_sample: Tensor, rows: _Rows, sample_weights: SampleWeights,
                     weight_normalize: str) -> Tensor:
        """``(1/N) Σ v_i·ℓ_i`` or ``Σ v_i·ℓ_i / Σ v_i`` over the global batch (per rank in local mode)."""
        if sample_weights is None:
            return rows.rank_factor * per_sample.sum() / rows.total
        local_losses = per_sample[rows.local]
        weights = sample_weights(local_losses.detach()) if callable(sample_weights) else sample_weights
        if weights.shape != local_losses.shape:
            raise ValueError(f"sample_weights returned shape {list(weights.shape)}, expected [n] = "
                             f"{list(local_losses.shape)}")
        weights = weights.to(per_sample.dtype)
        if rows.is_global and len(rows.sizes) > 1:
            gather = distributed.all_gather_with_grad if weights.requires_grad else distributed.all_gather_no_grad
            weights = gather(weights, rows.sizes)
        weighted_sum = rows.rank_factor * (weights * per_sample).sum()
        if weight_normalize == "mean":
            return weighted_sum / rows.total
        total = weights.sum()
        if not rows.is_global:
            total = (distributed.all_reduce_with_grad(total) if total.requires_grad
                     else distributed.all_reduce_values(total))
        # all-zero weights give a zero loss rather than 0/0
        return weighted_sum / total.clamp(min=torch.finfo(total.dtype).tiny)

    def _evaluate(
        self, rows: _Rows, scale: Tensor, sample_weights: SampleWeights, weight_normalize: str, draws: MixingDraws,
        input_dtype: torch.dtype,
    ) -> ObjectiveOutput:
        config = self.config
        offset = rows.offset
        # s scales the [r, D] rows rather than the [r, N] product; the other terms undo it per column
        plain_logits = (scale * rows.image) @ rows.all_text.T  # [r, N]: s⟨img_i, txt_j⟩
        # s⟨txt_i, img_j⟩; in global mode a transposed copy: element-wise kernels and log_softmax on
        # a transposed view run several times slower than on contiguous rows
        plain_logits_t = plain_logits.T.contiguous() if rows.is_global else (scale * rows.text) @ rows.all_image.T
        positive_cosine = (rows.image * rows.text).sum(dim=1)
        if self.contrastive == "angular_margin":
            positive = scale * _margin_cosine(positive_cosine, config.margin, input_dtype)
            logits = torch.diagonal_scatter(plain_logits, positive, offset)
            logits_t = torch.diagonal_scatter(plain_logits_t, positive, offset)
        else:
            logits, logits_t = plain_logits, plain_logits_t
        # CE_i = −log_softmax(L)_ii; log_softmax is one fused kernel each way, unlike logsumexp
        per_sample = -0.5 * (_positive_log_softmax(logits, offset) + _positive_log_softmax(logits_t, offset))

        values = {self.contrastive: self._contrastive(per_sample, rows, sample_weights, weight_normalize)}
        gram_image = gram_text = None
        if "m2mix" in self.term_weights or "calibrated_uniformity" in self.term_weights:
            gram_image = _gram(rows.image) if rows.is_global else rows.image @ rows.all_image.T
            gram_text = _gram(rows.text) if rows.is_global else rows.text @ rows.all_text.T
        if "m2mix" in self.term_weights:
            values["m2mix"] = self._m2mix(rows, scale, plain_logits, plain_logits_t, gram_image, gram_text,
                                          positive_cosine, draws.mix_lam)
        if "calibrated_uniformity" in self.term_weights:
            values["calibrated_uniformity"] = self._calibrated_uniformity(
                rows, scale, plain_logits, plain_logits_t, gram_image, gram_text, draws.calibration_lam)
        if "cma" in self.term_weights:
            # LSE_i = L_ii − log_softmax(L)_ii, exact also when the positive dominates the row
            plain_positive = plain_logits.diagonal(offset)
            cma_per_sample = -0.5 * ((plain_positive - _positive_log_softmax(plain_logits, offset))
                                     + (plain_positive - _positive_log_softmax(plain_logits_t, offset)))
            values["cma"] = rows.rank_factor * cma_per_sample.sum() / rows.total

        loss = sum(self.term_weights[name] * value for name, value in values.items())
        logged = torch.stack([value.detach() for value in values.values()] + [loss.detach()])
        if not rows.is_global:
            logged = distributed.all_reduce_values(logged, average=True)
            # every rank reports (and decides on, e.g. skipping a non-finite step) the global value
            loss = loss + (logged[-1] - loss).detach()
        terms = dict(zip([*values, "total"], logged.unbind()))
        return ObjectiveOutput(loss=loss, terms=terms, per_sample=per_sample[rows.local])

    def _m2mix(
        self, rows: _Rows, scale: Tensor, logits: Tensor, logits_t: Tensor, gram_image: Tensor, gram_text: Tensor,
        positive_cosine: Tensor, mix_lam: float,
    ) -> Tensor:
        tau = self.config.tau_mix
        lam = torch.as_tensor(mix_lam, dtype=logits.dtype, device=logits.device)
        weight_image, weight_text = _slerp_weights((rows.all_image * rows.all_text).sum(dim=1), lam)
        weight_image, weight_text = weight_image / tau, weight_text / tau
        # ⟨x_i, n_j⟩ = w_img,j·⟨x_i, img_j⟩ + w_txt,j·⟨x_i, txt_j⟩, with n_j the mixed embedding of pair j
        mixed_image = torch.addcmul(logits * (weight_text / scale), gram_image, weight_image)
        mixed_text = torch.addcmul(gram_text * weight_text, logits_t, weight_image / scale)
        positive = positive_cosine / tau
        mixed_image.diagonal(rows.offset).copy_(positive)
        mixed_text.diagonal(rows.offset).copy_(positive)
        per_sample = -0.5 * (_positive_log_softmax(mixed_image, rows.offset)
                             + _positive_log_softmax(mixed_text, rows.offset))
        return rows.rank_factor * per_sample.sum() / rows.total

    def _calibrated_uniformity(
        self, rows: _Rows, scale: Tensor, logits: Tensor, logits_t: Tensor, gram_image: Tensor, gram_text: Tensor,
        calibration_lam: np.ndarray,
    ) -> Tensor:
        config = self.config
        two_t = 2 * config.uniformity_t
        # For unit rows the exponents 2t(⟨x_i, x_j⟩ − S_ij) lie in [2t(−1 − max_sim), 2t(1 − min_sim)], so
        # the upper bound serves as log-sum-exp shift unless the range is wide enough to underflow exp.
        shift = two_t * (1 - config.min_sim)
        fixed_shift = two_t * (2 + config.max_sim - config.min_sim) < 80
        lam = torch.as_tensor(calibration_lam, dtype=gram_image.dtype, device=gram_image.device)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not config.detach_calibration):
            weight_image, weight_text = _slerp_weights((rows.all_image * rows.all_text).sum(dim=1), lam)
            # −2t·S_ij directly: the factor rides on the row weights (−2t·clamp(f) = clamp(−2t·f) flipped)
            row_weight_image = -two_t * weight_image[rows.offset:rows.offset + rows.image.shape[0], None]
            row_weight_text = -two_t * weight_text[rows.offset:rows.offset + rows.image.shape[0], None]
            # fused f_j = a_j·img_j + b_j·txt_j, so ⟨f_i, f_j⟩ = a_i⟨img_i, f_j⟩ + b_i⟨txt_i, f_j⟩
            # combines the blocks already computed instead of another matmul
            image_to_fused = torch.addcmul(logits * (weight_text / scale), gram_image, weight_image)
            text_to_fused = torch.addcmul(gram_text * weight_text, logits_t, weight_image / scale)
            base = torch.addcmul(image_to_fused * row_weight_image, text_to_fused, row_weight_text)
            base = base.clamp(-two_t * config.max_sim, -two_t * config.min_sim)
            if fixed_shift:
                base = base.sub_(shift)
            # Both ⟨x_i, x_j⟩ and S_ij are symmetric, so the mean over pairs i < j is the mean over all
            # i ≠ j: only the diagonal is masked, no triangle (and every rank's row block holds as many
            # pairs in local mode)
            base.diagonal(rows.offset).fill_(-math.inf)
        ordered_pairs = rows.total * (rows.total - 1)
        result = []
        for gram in (gram_image, gram_text):
            # −t(‖x_i − x_j‖² − 2 + 2·S_ij) = 2t(⟨x_i, x_j⟩ − S_ij) for unit rows: the value equals the
            # plain function's, the gradient lacks only the radial part that L2 normalisation removes
            exponents = torch.add(base, gram, alpha=two_t)
            if not fixed_shift:
                shift = exponents.detach().amax()
                exponents = exponents.sub_(shift)
            log_sum = exponents.exp_().sum().log() + shift
            if not rows.is_global:
                # log Σ over all pairs = LSE of every rank's partial log-sum; the gather carries the gradient
                log_sum = torch.logsumexp(distributed.all_gather_with_grad(log_sum.reshape(1)), dim=0)
            result.append(log_sum - math.log(ordered_pairs))
        return 0.5 * (result[0] + result[1])


def _gram(features: Tensor) -> Tensor:
    """``features·featuresᵀ`` whose backward is one matmul, ``(G̅ + G̅ᵀ)·features``, instead of two."""
    return _SymmetricGram.apply(features)


class _SymmetricGram(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(features)
        return features @ features.T

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        (features,) = ctx.saved_tensors
        # written with differentiable ops, so second-order gradients (meta step) pass through
        return (grad + grad.T.contiguous()) @ features


def _positive_log_softmax(logits: Tensor, offset: int) -> Tensor:
    """``log_softmax(logits, dim=1)`` at the positives, entries ``(k, offset + k)``."""
    return torch.log_softmax(logits, dim=1).diagonal(offset)


# --------------------------------------------------------------------------------------------
# checks at the seam


def _validate(config: LossConfig) -> None:
    for name, weight in config.terms.items():
        if name not in TERMS:
            close = difflib.get_close_matches(name, list(TERMS), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(f"loss.terms: unknown term {name!r}{hint} (known: {', '.join(TERMS)})")
        if not (math.isfinite(weight) and weight >= 0):
            raise ConfigError(f"loss.terms.{name}={weight} must be a finite number >= 0")
    contrastive = [name for name in config.terms if TERMS[name].contrastive]
    if len(contrastive) != 1:
        raise ConfigError(f"loss.terms must hold exactly one of "
                          f"{[name for name, term in TERMS.items() if term.contrastive]}, got {contrastive or 'none'}")
    if not 0 <= config.margin < math.pi:
        raise ConfigError(f"loss.margin={config.margin} must be in [0, π)")
    for key in ("m2mix_alpha", "tau_mix", "uniformity_t", "calibration_alpha"):
        if not getattr(config, key) > 0:
            raise ConfigError(f"loss.{key}={getattr(config, key)} must be > 0")
    if not -1 <= config.min_sim <= config.max_sim <= 1:
        raise ConfigError(f"loss.min_sim={config.min_sim}, loss.max_sim={config.max_sim} "
                          f"must satisfy -1 <= min_sim <= max_sim <= 1")
    if config.local_loss and not config.gather_with_grad:
        raise ConfigError("loss.local_loss=true needs loss.gather_with_grad=true: without gradients through the "
                          "gather each rank misses the other ranks' terms and the result is not the global loss")


def _check_inputs(
    image_features: Tensor, text_features: Tensor, logit_scale: float | Tensor, sample_weights: SampleWeights,
    weight_normalize: str, seed: int | None,
) -> None:
    for name, features in (("image_features", image_features), ("text_features", text_features)):
        if not isinstance(features, Tensor) or features.dim() != 2 or not features.is_floating_point():
            shape = list(features.shape) if isinstance(features, Tensor) else type(features).__name__
            raise ValueError(f"{name} must be a 2-D float tensor [n, D], got {shape}")
        if features.shape[0] < 2 or features.shape[1] < 1:
            raise ValueError(f"{name} must hold at least 2 samples per process (contrastive), "
                             f"got shape {list(features.shape)}")
    if image_features.shape != text_features.shape:
        raise ValueError(f"image_features and text_features must have the same shape [n, D], "
                         f"got {list(image_features.shape)} and {list(text_features.shape)}")
    if image_features.device != text_features.device:
        raise ValueError(f"image_features ({image_features.device}) and text_features ({text_features.device}) "
                         f"must be on the same device")
    if isinstance(logit_scale, Tensor) and logit_scale.numel() != 1:
        raise ValueError(f"logit_scale must be a float or a one-element tensor, got shape {list(logit_scale.shape)}")
    if not isinstance(logit_scale, Tensor) and not logit_scale > 0:
        raise ValueError(f"logit_scale={logit_scale} must be > 0 (it is the multiplier exp(log-scale))")
    if weight_normalize not in ("mean", "sum"):
        raise ValueError(f"weight_normalize={weight_normalize!r} must be 'mean' or 'sum'")
    if seed is not None and not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed={seed!r} must be an integer or None")
    if sample_weights is not None and not callable(sample_weights):
        if not isinstance(sample_weights, Tensor) or sample_weights.shape != (image_features.shape[0],):
            shape = list(sample_weights.shape) if isinstance(sample_weights, Tensor) else type(sample_weights).__name__
            raise ValueError(f"sample_weights must be a tensor of shape [n] = [{image_features.shape[0]}] or a "
                             f"callable, got {shape}")
        if not sample_weights.is_floating_point():
            raise ValueError(f"sample_weights must be a float tensor, got {sample_weights.dtype}")
    # one host sync for all value checks; NaN rows pass, so a diverged model yields a non-finite loss
    # that the training loop counts and skips instead of an exception
    with torch.no_grad():
        checks = [((torch.linalg.vector_norm(features.float(), dim=1) - 1).abs().amax())
                  for features in (image_features, text_features)]
        checks.append(torch.as_tensor(logit_scale, dtype=torch.float32, device=image_features.device).reshape(()))
        if isinstance(sample_weights, Tensor):
            checks.append((-sample_weights.float()).amax())
        found = torch.stack(checks).tolist()
    for name, features, deviation in zip(("image_features", "text_features"), (image_features, text_features), found):
        # half-precision rows carry norm errors of a few 1e-3
        tolerance = 2e-2 if features.dtype in (torch.float16, torch.bfloat16) else 1e-3
        if deviation > tolerance:
            raise ValueError(f"{name} must hold L2-normalised rows: max |‖row‖ − 1| = {deviation:.3g} "
                             f"(tolerance {tolerance:g}); pass the encoder's normalised features")
    if found[2] <= 0:
        raise ValueError(f"logit_scale={found[2]:.3g} must be > 0 (it is the multiplier exp(log-scale))")
    if isinstance(sample_weights, Tensor) and found[3] > 0:
        raise ValueError(f"sample_weights must be >= 0, got a minimum of {-found[3]:.3g}")
