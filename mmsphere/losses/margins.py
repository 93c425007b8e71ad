"""The hyperspherical margin losses of face recognition as cross-modal contrastive terms.

Face-recognition losses act on a sample's logits against C class proxies. Here the "classes" of
image i are the N captions of the (global) batch and those of caption i the N images:
``C_ij = ⟨img_i, txt_j⟩``, positives ``P(i) = {j : g_j = g_i}`` (the diagonal when ``group_ids`` is
None), per-sample ``ℓ_i = ½[row-loss_i + column-loss_i]``, the margin applied to every positive,
``θ = arccos(clamp(C, −1+ε, 1−ε))`` with ε as in :func:`~mmsphere.losses.functional.angular_margin_loss`.

Every loss is one registered term whose class is its whole definition, in the shape of
pytorch-metric-learning's large-margin losses: :class:`MarginTerm` builds the ``[r, N]`` cosines of
this rank's rows (:class:`MarginBatch`), applies the term's positives' and negatives' transforms
(:meth:`MarginTerm.transformed`, with characteristic gradient detachment, :func:`detach_offset`)
and reduces each direction with the multi-positive cross-entropy ``CE_P`` of UniCL (CVPR 2022);
a loss supplies its transforms, options and docstring (SFace and SphereFace2 also their own
reduction). The functions (``cosface_loss``, ...) build the same term from their arguments and
evaluate it on the whole batch, so function and term are one code path; the objective calls the
term on its gathered rows (global or ``local_loss`` mode).

Defaults are small and CLIP-appropriate: the face values (s 30–64, CosFace 0.35, ArcFace 0.5,
SphereFace-R 1.4–1.7, Cam-Softmax c → π/4, SphereFace2 λ 0.7 / r 40 / m 0.4 / t 3, SFace
k 80 / a 0.8 / b 1.23) push a CLIP-like positive (cos ≈ 0.3) below its negatives (cos ≈ 0.1), so
each option names its face value beside the default; studies sweep them.

What the objective passes besides the features: ``context.step`` (the training step, the same on
every rank, for Cam-Softmax's schedule) and, for SphereFace-R's ``none`` and ``soft``, which declare
``needs_feature_norms``, ``context.image_norms`` / ``context.text_norms`` (the features' norms
before L2 normalisation, gathered with their gradient beside the features).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

# from the defining module, not the package: mmsphere.losses.functional re-exports the functions below,
# so this module is imported while the package's __init__ is still running
from mmsphere.losses.terms import Term, TermContext, TermOptions, register_term
from mmsphere.losses.numerics import (REDUCTIONS, _arccos_eps, _as_scale, _check_pair, _positive_mask, _reduce,
                                      _upcast, row_loss_bias)

__all__ = [
    "cosface_loss",
    "arcface_loss",
    "sphereface_r_loss",
    "cam_softmax_loss",
    "sface_loss",
    "sphereface2_loss",
    "cam_softmax_c",
    "cam_softmax_exponent",
    "sphereface2_bias_init",
    "sface_ab_from_features",
    "detach_offset",
    "MarginBatch",
    "MarginTerm",
]

logger = logging.getLogger(__name__)

# CLIP's initial logit scale 1/0.07 (Radford et al. 2021): the fixed scale defaults start there
CLIP_SCALE = 1 / 0.07


# --------------------------------------------------------------------------------------------
# the shared machinery


def detach_offset(cosine: Tensor, psi: Tensor) -> Tensor:
    """``C + sg[ψ(C) − C]``: the value of ψ, the gradient of the plain cosine (CGD, SphereFace-R, TPAMI 2022)."""
    return cosine + (psi - cosine).detach()


@dataclass
class MarginBatch:
    """What a margin term reads: this rank's rows against the columns of the whole batch, both directions."""

    image_rows: Tensor  # [r, N] ⟨img_i, txt_j⟩
    text_rows: Tensor | None  # [r, N] ⟨txt_i, img_j⟩; None: the rows are the whole batch, so it is image_rowsᵀ
    positives: Tensor | None  # [r, N] bool, g_i = g_j; None: the diagonal at `offset` alone
    offset: int  # global index of the first row
    scale: Tensor  # the logit multiplier s, 0-d
    eps: float  # arccos clamp of the input dtype
    logit_bias: Tensor | None = None  # SphereFace2's b, 0-d
    image_norms: Tensor | None = None  # [r] norms of the image rows before L2 normalisation
    text_norms: Tensor | None = None
    step: int | None = None  # training step, for schedules; None: unknown

    @classmethod
    def from_features(
        cls,
        img: Tensor,
        txt: Tensor,
        logit_scale: float | Tensor,
        *,
        group_ids: Tensor | None = None,
        logit_bias: float | Tensor | None = None,
        norms: tuple[Tensor, Tensor] | None = None,
        step: int = 0,
    ) -> MarginBatch:
        """The whole batch of one process (what the functions evaluate)."""
        _check_pair(img, txt)
        positives = _positive_mask(group_ids, img)
        eps = _arccos_eps(img.dtype)
        img, txt = _upcast(img), _upcast(txt)
        bias = None if logit_bias is None else _as_scale(logit_bias, img, name="logit_bias")
        image_norms = text_norms = None
        if norms is not None:
            if (not isinstance(norms, (tuple, list)) or len(norms) != 2
                    or any(not isinstance(n, Tensor) or n.shape != img.shape[:1] for n in norms)):
                raise ValueError(f"norms must be a pair (image_norms, text_norms) of tensors of shape [B] = "
                                 f"[{img.shape[0]}]")
            image_norms, text_norms = (n.to(device=img.device, dtype=img.dtype) for n in norms)
        return cls(img @ txt.T, None, positives, 0, _as_scale(logit_scale, img), eps, bias,
                   image_norms, text_norms, step)

    @classmethod
    def from_context(cls, context: TermContext) -> MarginBatch:
        """The rows an objective call evaluates (global mode: all; ``local_loss``: this rank's)."""
        rows = context.rows
        local = slice(context.offset, context.offset + rows.image.shape[0])
        image_norms, text_norms = context.image_norms, context.text_norms
        return cls(
            rows.image @ rows.all_text.T,
            None if rows.is_global else rows.text @ rows.all_image.T,
            context.same_group,
            context.offset,
            context.scale,
            _arccos_eps(context.input_dtype),
            context.logit_bias,
            None if image_norms is None else image_norms[local],
            None if text_norms is None else text_norms[local],
            context.step,
        )

    def theta(self, cosine: Tensor) -> Tensor:
        """``arccos(clamp(C, −1+ε, 1−ε))``: finite with finite gradients for identical and antipodal pairs."""
        return torch.arccos(cosine.clamp(-1 + self.eps, 1 - self.eps))

    def directions(self, transform: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
        """``transform`` of the image rows' and the text rows' cosines, each [r, N]."""
        image = transform(self.image_rows)
        if self.text_rows is None:
            # the transforms act entry by entry and P is symmetric, so the text rows are the transpose;
            # contiguous because row-wise kernels on a transposed view run several times slower
            return image, image.T.contiguous()
        return image, transform(self.text_rows)

    def positive_mask(self) -> Tensor:
        """[r, N] bool: the positives, the diagonal materialised when every sample is its own group."""
        if self.positives is not None:
            return self.positives
        mask = torch.zeros(self.image_rows.shape, dtype=torch.bool, device=self.image_rows.device)
        mask.diagonal(self.offset).fill_(True)
        return mask

    def positive_mean_log_softmax(self, logits: Tensor) -> Tensor:
        """``−CE_P`` of each row [r]: the mean of ``log_softmax(logits)`` over the row's positives."""
        log_probabilities = F.log_softmax(logits, dim=1)
        if self.positives is None:
            return log_probabilities.diagonal(self.offset)
        # where, not a product with the mask: a −inf log-probability off the positives would give NaN
        return torch.where(self.positives, log_probabilities, 0.0).sum(dim=1) / self.positives.sum(dim=1)


class MarginTerm(Term):
    """A margin loss: positives' and negatives' transforms of the cosines, reduced with ``CE_P`` per direction.

    Subclasses set ``name``, ``description``, ``Options`` and override :meth:`positive` and/or
    :meth:`negative` (None: the entry keeps its cosine); ``Options.detach`` switches on
    characteristic gradient detachment.
    """

    contrastive = True

    def positive(self, cosine: Tensor, batch: MarginBatch) -> Tensor | None:
        """The positives' ψ(C), entry by entry (None: unchanged)."""
        return None

    def negative(self, cosine: Tensor, batch: MarginBatch) -> Tensor | None:
        """The negatives' ψ(C), entry by entry (None: unchanged)."""
        return None

    def row_scales(self, batch: MarginBatch) -> tuple[Tensor, Tensor]:
        """The logit multiplier of the image rows and of the text rows (s, or [r, 1])."""
        return batch.scale, batch.scale

    def transformed(self, cosine: Tensor, batch: MarginBatch) -> Tensor:
        """Cosines [r, N] with the positives' and the negatives' transforms applied."""
        detach = getattr(self.options, "detach", False)

        def apply(transform: Callable[[Tensor, MarginBatch], Tensor | None], values: Tensor) -> Tensor | None:
            psi = transform(values, batch)
            return psi if psi is None or not detach else detach_offset(values, psi)

        negatives = apply(self.negative, cosine)
        if batch.positives is None:
            # one positive per row: transform the diagonal alone, not the whole matrix
            diagonal = cosine.diagonal(batch.offset)
            positives = apply(self.positive, diagonal)
            if negatives is None:
                return cosine if positives is None else torch.diagonal_scatter(cosine, positives, batch.offset)
            return torch.diagonal_scatter(negatives, diagonal if positives is None else positives, batch.offset)
        positives = apply(self.positive, cosine)
        if positives is None and negatives is None:
            return cosine
        return torch.where(batch.positives, cosine if positives is None else positives,
                           cosine if negatives is None else negatives)

    def per_sample(self, batch: MarginBatch) -> Tensor:
        """``ℓ_i = ½[CE_P(s·ψ(C))_i + CE_P(s·ψ(Cᵀ))_i]`` of the rows [r]."""
        image, text = batch.directions(lambda cosine: self.transformed(cosine, batch))
        image_scale, text_scale = self.row_scales(batch)
        return -0.5 * (batch.positive_mean_log_softmax(image_scale * image)
                       + batch.positive_mean_log_softmax(text_scale * text))

    def forward(self, context: TermContext) -> Tensor:
        return self.per_sample(MarginBatch.from_context(context))

    def evaluate(
        self,
        img: Tensor,
        txt: Tensor,
        logit_scale: float | Tensor,
        *,
        group_ids: Tensor | None = None,
        reduction: str = "mean",
        logit_bias: float | Tensor | None = None,
        norms: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """This term on the whole batch ``img, txt: [B, D]`` of one process, reduced (the functions' body)."""
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction={reduction!r} must be one of {REDUCTIONS}")
        batch = MarginBatch.from_features(img, txt, logit_scale, group_ids=group_ids, logit_bias=logit_bias,
                                          norms=norms)
        return _reduce(self.per_sample(batch), reduction)


def _checked(options: TermOptions, problems: list[str] | None = None) -> TermOptions:
    """``options``, or a ValueError naming the first problem (the functions' argument check)."""
    problems = options.check() if problems is None else problems
    if problems:
        raise ValueError(problems[0])
    return options


def _power_activation(cosine: Tensor, power: float, eps: float) -> Tensor:
    """``2((1 + x)/2)^p − 1``: SphereFace2's g (p = t) and Cam-Softmax's ψ_c (p from c); p = 1 is x exactly."""
    if power == 1:
        return cosine
    # x below −1 by rounding must not reach a fractional power; for p < 1 the slope p/2·((1+x)/2)^(p−1)
    # is infinite at x = −1 (antipodal pairs), so the base stays ε/2 away from 0, as θ stays ε from π
    base = ((1 + cosine) / 2).clamp(min=eps / 2 if power < 1 else 0.0)
    return 2 * base.pow(power) - 1


# --------------------------------------------------------------------------------------------
# CosFace


@dataclass(frozen=True)
class CosFaceOptions(TermOptions):
    margin: float = 0.1  # face: 0.35 with s = 64 (CosFace)
    detach: bool = False

    def check(self) -> list[str]:
        return [] if 0 <= self.margin <= 2 else [f"margin={self.margin} must be in [0, 2] (a cosine margin)"]


@register_term
class CosFace(MarginTerm):
    """Large margin cosine loss (CosFace, Wang et al., CVPR 2018): positives ``s(C − m)``, negatives ``s·C``.

    m = 0 is CLIP. The offset −m is a constant, so ``detach`` changes nothing here.
    """

    name = "cosface"
    description = "additive cosine margin (CosFace, CVPR'18)"
    Options = CosFaceOptions

    def positive(self, cosine: Tensor, batch: MarginBatch) -> Tensor:
        return cosine - self.options.margin


def cosface_loss(
    img: Tensor,
    txt: Tensor,
    logit_scale: float | Tensor,
    margin: float = CosFaceOptions.margin,
    group_ids: Tensor | None = None,
    reduction: str = "mean",
    detach: bool = False,
) -> Tensor:
    """CosFace (CVPR 2018) across modalities: positives ``s(C − m)``, negatives ``s·C``, ``CE_P`` both ways.

    img, txt: [B, D] unit-norm; group_ids: optional [B] integers (pairs sharing an id are positives).
    Returns the mean, sum or per-sample losses [B].
    """
    options = _checked(CosFaceOptions(margin, detach))
    return CosFace(options).evaluate(img, txt, logit_scale, group_ids=group_ids, reduction=reduction)


# --------------------------------------------------------------------------------------------
# ArcFace

ARCFACE_FALLBACKS = ("insightface", "clamp")


@dataclass(frozen=True)
class ArcFaceOptions(TermOptions):
    margin: float = 0.1  # face: 0.5 with s = 64 (ArcFace)
    fallback: str = "insightface"  # where θ + m > π
    detach: bool = False

    def check(self) -> list[str]:
        problems = [] if -math.pi < self.margin < math.pi else [f"margin={self.margin} must be in (−π, π)"]
        if self.fallback not in ARCFACE_FALLBACKS:
            problems.append(f"fallback={self.fallback!r} must be one of {ARCFACE_FALLBACKS}")
        return problems


@register_term
class ArcFace(MarginTerm):
    """Additive angular margin (ArcFace, Deng et al., CVPR 2019): positives ``s·cos(θ + m)``, negatives ``s·C``.

    Where ``θ + m > π`` the cosine would rise again: ``insightface`` continues with ``C − m·sin m``
    (the reference implementation), ``clamp`` takes ``cos π = −1``. A negative m is MAMA's
    subtractive margin: ``arcface(−m) = angular_margin(m)``.
    """

    name = "arcface"
    description = "additive angular margin (ArcFace, CVPR'19)"
    Options = ArcFaceOptions

    def positive(self, cosine: Tensor, batch: MarginBatch) -> Tensor:
        margin = self.options.margin
        shifted = batch.theta(cosine) + margin
        if self.options.fallback == "clamp":
            return torch.cos(shifted.clamp(max=math.pi))
        return torch.where(shifted > math.pi, cosine - margin * math.sin(margin), torch.cos(shifted))


def arcface_loss(
    img: Tensor,
    txt: Tensor,
    logit_scale: float | Tensor,
    margin: float = ArcFaceOptions.margin,
    fallback: str = "insightface",
    group_ids: Tensor | None = None,
    reduction: str = "mean",
    detach: bool = False,
) -> Tensor:
    """ArcFace (CVPR 2019) across modalities: positives ``s·cos(θ + m)``, negatives ``s·C``, ``CE_P`` both ways.

    img, txt: [B, D] unit-norm; fallback where ``θ + m > π``: ``"insightface"`` (``C − m·sin m``) or
    ``"clamp"`` (θ + m clamped to π). Returns the mean, sum or per-sample losses [B].
    """
    options = _checked(ArcFaceOptions(margin, fallback, detach))
    return ArcFace(options).evaluate(img, txt, logit_scale, group_ids=group_ids, reduction=reduction)


# --------------------------------------------------------------------------------------------
# SphereFace-R

SPHEREFACE_R_VERSIONS = ("v0", "v1", "v2")
SPHEREFACE_R_NORMALIZATIONS = ("hard", "none", "soft")


@dataclass(frozen=True)
class SphereFaceROptions(TermOptions):
    margin: float = 1.1  # multiplicative, >= 1; face: 1.4–1.7 with s = 30 (SphereFace-R)
    version: str = "v1"
    normalization: str = "hard"
    detach: bool = True  # SphereFace-R trains with CGD
    norm_weight: float = 0.1  # t of soft normalisation's t·|‖x‖ − s₀|
    norm_target: float = CLIP_SCALE  # s₀; face: s = 30

    def value_problems(self) -> list[str]:
        """Problems with the values themselves (what the function checks)."""
        problems = [] if 1 <= self.margin < 1e3 else [f"margin={self.margin} must be >= 1 (multiplicative)"]
        if self.version not in SPHEREFACE_R_VERSIONS:
            problems.append(f"version={self.version!r} must be one of {SPHEREFACE_R_VERSIONS}")
        if self.normalization not in SPHEREFACE_R_NORMALIZATIONS:
            problems.append(f"normalization={self.normalization!r} must be one of {SPHEREFACE_R_NORMALIZATIONS}")
        if not (self.norm_weight >= 0 and self.norm_target > 0):
            problems.append(f"norm_weight={self.norm_weight}, norm_target={self.norm_target} must be >= 0 and > 0")
        return problems

    def check(self) -> list[str]:
        return self.value_problems()


@register_term
class SphereFaceR(MarginTerm):
    """Multiplicative angular margin (SphereFace-R, Liu et al., TPAMI 2022), in three versions.

    v0 (SphereFace's ψ): positives ``(−1)^k cos(mθ) − 2k``, ``k = ⌊mθ/π⌋``; v1: positives
    ``cos(min(mθ, π))``; v2: positives ``C``, negatives ``cos(θ/m)``; m = 1 is CLIP. Normalisation:
    ``hard`` scales by s; ``none`` scales each row by its feature's norm before L2 normalisation;
    ``soft`` does the same and adds ``t·|‖x‖ − s₀|`` per row. CGD (``detach``) is on by default, as
    the paper trains it.
    """

    name = "sphereface_r"
    description = "multiplicative angular margin with CGD (SphereFace-R, TPAMI'22)"
    Options = SphereFaceROptions

    @property
    def needs_feature_norms(self) -> bool:  # type: ignore[override]
        """``none`` and ``soft`` scale each row by its feature's norm before L2 normalisation."""
        return self.options.normalization != "hard"

    def positive(self, cosine: Tensor, batch: MarginBatch) -> Tensor | None:
        version, margin = self.options.version, self.options.margin
        if version == "v2":
            return None
        angle = margin * batch.theta(cosine)
        if version == "v1":
            return torch.cos(angle.clamp(max=math.pi))
        k = torch.floor(angle / math.pi).detach()
        return (1 - 2 * torch.remainder(k, 2)) * torch.cos(angle) - 2 * k

    def negative(self, cosine: Tensor, batch: MarginBatch) -> Tensor | None:
        if self.options.version != "v2":
            return None
        return torch.cos(batch.theta(cosine) / self.options.margin)

    def row_scales(self, batch: MarginBatch) -> tuple[Tensor, Tensor]:
        if self.options.normalization == "hard":
            return batch.scale, batch.scale
        if batch.image_norms is None or batch.text_norms is None:
            raise ValueError(f"sphereface_r with normalization={self.options.normalization!r} needs the feature "
                             f"norms before L2 normalisation (norms=(image_norms, text_norms))")
        return batch.image_norms[:, None], batch.text_norms[:, None]

    def per_sample(self, batch: MarginBatch) -> Tensor:
        per_sample = super().per_sample(batch)
        if self.options.normalization == "hard":
            return per_sample
        # the norms replace s: 0·s keeps logit_scale in the graph with an exact zero gradient, as
        # data-parallel training expects every parameter to receive one
        per_sample = per_sample + 0 * batch.scale
        if self.options.normalization == "none":
            return per_sample
        target, weight = self.options.norm_target, self.options.norm_weight
        return per_sample + 0.5 * weight * ((batch.image_norms - target).abs() + (batch.text_norms - target).abs())


def sphereface_r_loss(
    img: Tensor,
    txt: Tensor,
    logit_scale: float | Tensor,
    margin: float = SphereFaceROptions.margin,
    version: str = "v1",
    normalization: str = "hard",
    group_ids: Tensor | None = None,
    reduction: str = "mean",
    detach: bool = True,
    norms: tuple[Tensor, Tensor] | None = None,
    norm_weight: float = SphereFaceROptions.norm_weight,
    norm_target: float = SphereFaceROptions.norm_target,
) -> Tensor:
    """SphereFace-R (TPAMI 2022) across modalities: multiplicative margin m >= 1, versions v0/v1/v2.

    img, txt: [B, D] unit-norm. normalization ``"none"``/``"soft"`` need ``norms = (image_norms,
    text_norms)``, each [B], the features' norms before L2 normalisation (the row scale replacing s;
    ``soft`` adds ``norm_weight·|‖x‖ − norm_target|`` per direction). Returns the mean, sum or [B].
    """
    options = SphereFaceROptions(margin, version, normalization, detach, norm_weight, norm_target)
    _checked(options, options.value_problems())
    return SphereFaceR(options).evaluate(img, txt, logit_scale, group_ids=group_ids, reduction=reduction, norms=norms)


# --------------------------------------------------------------------------------------------
# Cam-Softmax


def cam_softmax_exponent(c: float) -> float:
    """``p = 1/(1 − log₂(1 + cos c))``: ψ_c maps cos c to 0 (c = π/2: p = 1, plain softmax)."""
    if not 0 < c < math.pi:
        raise ValueError(f"c={c} must be in (0, π)")
    return 1 / (1 - math.log2(1 + math.cos(c)))


def cam_softmax_c(step: int, c_start: float, c_stop: float, c_decay: float) -> float:
    """The schedule of c: from ``c_start`` towards ``c_stop`` by ``c_decay`` per step, then held.

    A pure function of the step, so a resumed run continues the schedule exactly.
    """
    if step < 0 or c_decay < 0:
        raise ValueError(f"step={step} and c_decay={c_decay} must be >= 0")
    if c_start >= c_stop:
        return max(c_stop, c_start - c_decay * step)
    return min(c_stop, c_start + c_decay * step)


@dataclass(frozen=True)
class CamSoftmaxOptions(TermOptions):
    c_start: float = math.pi / 2  # plain softmax
    c_stop: float = 1.45  # ψ_c(0.3) ≈ 0.2, like CosFace m = 0.1; face: π/4 (ψ_c(0.3) ≈ −0.7)
    c_decay: float = 1e-4  # per step: c_stop after ~1200 steps
    detach: bool = False

    def check(self) -> list[str]:
        problems = [f"{key}={getattr(self, key)} must be in (0, π)" for key in ("c_start", "c_stop")
                    if not 0 < getattr(self, key) < math.pi]
        if not self.c_decay >= 0:
            problems.append(f"c_decay={self.c_decay} must be >= 0")
        return problems


@register_term
class CamSoftmax(MarginTerm):
    """Generalised target activation (Cam-Softmax): positives ``s·ψ_c(C)``, negatives ``s·C``.

    ``ψ_c(x) = 2((1 + x)/2)^p − 1``, ``p = 1/(1 − log₂(1 + cos c))``, so ψ_c(cos c) = 0; c = π/2 is
    CLIP. c follows :func:`cam_softmax_c` of the training step (``context.step``; outside training,
    where there is no step, ``c_start``).
    """

    name = "cam_softmax"
    description = "generalised target activation with a scheduled c (Cam-Softmax)"
    Options = CamSoftmaxOptions
    _warned = False

    def c(self, step: int | None) -> float:
        """c at ``step`` (None: the objective did not say, taken as 0)."""
        if step is None:
            if not self._warned:
                logger.warning("cam_softmax evaluated outside training (no step): c is c_start=%.4g",
                               self.options.c_start)
                self._warned = True
            step = 0
        return cam_softmax_c(step, self.options.c_start, self.options.c_stop, self.options.c_decay)

    def positive(self, cosine: Tensor, batch: MarginBatch) -> Tensor:
        return _power_activation(cosine, cam_softmax_exponent(self.c(batch.step)), batch.eps)


def cam_softmax_loss(
    img: Tensor,
    txt: Tensor,
    logit_scale: float | Tensor,
    c: float = CamSoftmaxOptions.c_stop,
    group_ids: Tensor | None = None,
    reduction: str = "mean",
    detach: bool = False,
) -> Tensor:
    """Cam-Softmax across modalities at a given c: positives ``s·ψ_c(C)``, negatives ``s·C``, ``CE_P`` both ways.

    img, txt: [B, D] unit-norm; c in (0, π), π/2 is CLIP; :func:`cam_softmax_c` gives c of a step.
    Returns the mean, sum or per-sample losses [B].
    """
    options = _checked(CamSoftmaxOptions(c_start=c, c_stop=c, c_decay=0.0, detach=detach))
    return CamSoftmax(options).evaluate(img, txt, logit_scale, group_ids=group_ids, reduction=reduction)


# --------------------------------------------------------------------------------------------
# SFace

SFACE_INTER_REDUCTIONS = ("sum", "mean")


@dataclass(frozen=True)
class SFaceOptions(TermOptions):
    scale: float = CLIP_SCALE  # fixed; face: 64
    k: float = 20.0  # sigmoid slope per radian; face: 80
    a: float = 1.0  # intra: positives nearer than a (rad) stop pulling; face: 0.8
    b: float = 1.5  # inter: negatives farther than b (rad) stop pushing; face: 1.23 (no push on CLIP negatives)
    inter_reduction: str = "sum"

    def check(self) -> list[str]:
        problems = [f"{key}={getattr(self, key)} must be > 0" for key in ("scale", "k") if not getattr(self, key) > 0]
        problems += [f"{key}={getattr(self, key)} must be in [0, π]" for key in ("a", "b")
                     if not 0 <= getattr(self, key) <= math.pi]
        if self.inter_reduction not in SFACE_INTER_REDUCTIONS:
            problems.append(f"inter_reduction={self.inter_reduction!r} must be one of {SFACE_INTER_REDUCTIONS}")
        return problems


@register_term
class SFace(MarginTerm):
    """Sigmoid-constrained hypersphere loss (SFace, Zhong et al., TIP 2021), linear in the cosines.

    Row i: intra ``−mean_{p∈P(i)} sg[σ(k(θ_ip − a))]·scale·C_ip`` plus inter
    ``Σ_{j∉P(i)} sg[σ(−k(θ_ij − b))]·scale·C_ij`` (or the mean, ``inter_reduction``). The sigmoids only
    rescale gradients, which is what makes it robust to label noise. ``scale`` is fixed: the term never
    trains ``logit_scale``. Its per-sample values can be negative and are no loss on a common scale, so
    a WeightNet reads another per-sample input (:meth:`weight_input`): the detached symmetric
    cross-entropy of the plain logits ``scale·C`` (CLIP's loss at SFace's scale, with the same positives).
    """

    name = "sface"
    description = "sigmoid-constrained hypersphere loss, fixed scale (SFace, TIP'21)"
    Options = SFaceOptions

    def per_sample(self, batch: MarginBatch) -> Tensor:
        options = self.options

        def sums(cosine: Tensor, dims: tuple[int, ...]) -> list[Tensor]:
            """Row loss sums over ``dims`` of ``sg[w_ij]·C_ij`` [r, N] (intra weights negative, over |P|)."""
            # detach, not no_grad: no_grad leaves forward-mode tangents on, and the meta step's
            # forward-mode pass must see the sigmoids as constants, as the backward does
            theta = batch.theta(cosine.detach())
            inter = torch.sigmoid(-options.k * (theta - options.b))
            if batch.positives is None:
                # one positive per row: the inter weights everywhere, then the diagonal's intra weight
                if options.inter_reduction == "mean":
                    inter = inter / max(cosine.shape[1] - 1, 1)
                intra = -torch.sigmoid(options.k * (theta.diagonal(batch.offset) - options.a))
                terms = torch.diagonal_scatter(inter, intra, batch.offset) * cosine
                return [terms.sum(dim=dim) for dim in dims]
            # groups: each direction divides by its own row's counts (P is symmetric, so a column's
            # counts are those of the row of the same sample)
            positives = batch.positives
            intra = torch.where(positives, -torch.sigmoid(options.k * (theta - options.a)) * cosine, 0.0)
            inter = torch.where(positives, 0.0, inter * cosine)
            positive_count = positives.sum(dim=1)
            negative_count = (positives.shape[1] - positive_count).clamp(min=1)
            if options.inter_reduction == "sum":
                negative_count = torch.ones_like(negative_count)
            return [intra.sum(dim=dim) / positive_count + inter.sum(dim=dim) / negative_count for dim in dims]

        if batch.text_rows is None:
            # the rows are the whole batch: the weights are entry-wise and P symmetric, so the text
            # direction is the column sums of the same matrix
            rows, columns = sums(batch.image_rows, (1, 0))
        else:
            (rows,), (columns,) = sums(batch.image_rows, (1,)), sums(batch.text_rows, (1,))
        # 0·s keeps logit_scale in the graph with an exact zero gradient: data-parallel training
        # expects every parameter to receive one
        return 0.5 * options.scale * (rows + columns) + 0 * batch.scale

    def weight_input(self, context: TermContext, per_sample: Tensor) -> Tensor:
        """The plain cross-entropy ``½[CE_P(scale·C) + CE_P(scale·Cᵀ)]`` of each row, detached (the WeightNet's input)."""
        batch = MarginBatch.from_context(context)
        image, text = batch.directions(lambda cosine: self.options.scale * cosine)
        return (-0.5 * (batch.positive_mean_log_softmax(image) + batch.positive_mean_log_softmax(text))).detach()


def sface_ab_from_features(
    img: Tensor,
    txt: Tensor,
    group_ids: Tensor | None = None,
    positive_quantile: float = 0.1,
    negative_quantile: float = 0.9,
) -> tuple[float, float]:
    """SFace's ``(a, b)`` from measured angles: quantiles of the positive and of the negative pairs' θ (radians).

    The face defaults (a 0.8, b 1.23) give CLIP-like negatives (θ ≈ 1.47) no push at all. Measured on
    the features of the first batches: with ``a`` the ``positive_quantile`` of the positives' angles,
    all but the closest 10% of positives are pulled; with ``b`` the ``negative_quantile`` of the
    negatives' angles, all but the farthest 10% of negatives are pushed (each by at least half).
    img, txt: [B, D] unit-norm (concatenate several batches' features; positives are pairs ``(i, j)``
    with ``g_i = g_j``, both directions of the image–text matrix).
    """
    _check_pair(img, txt)
    if not (0 <= positive_quantile <= 1 and 0 <= negative_quantile <= 1):
        raise ValueError(f"positive_quantile={positive_quantile} and negative_quantile={negative_quantile} "
                         f"must be in [0, 1]")
    positives = _positive_mask(group_ids, img)
    if positives is None:
        positives = torch.eye(img.shape[0], dtype=torch.bool, device=img.device)
    with torch.no_grad():
        theta = torch.arccos((_upcast(img) @ _upcast(txt).T).clamp(-1.0, 1.0)).double()
        if positives.all():
            raise ValueError("every pair is a positive: no negative angles to measure b from")
        a = torch.quantile(theta[positives], positive_quantile).item()
        b = torch.quantile(theta[~positives], negative_quantile).item()
    return a, b


def sface_loss(
    img: Tensor,
    txt: Tensor,
    scale: float = SFaceOptions.scale,
    k: float = SFaceOptions.k,
    a: float = SFaceOptions.a,
    b: float = SFaceOptions.b,
    inter_reduction: str = "sum",
    group_ids: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """SFace (TIP 2021) across modalities: sigmoid-weighted intra pull and inter push, linear in C.

    img, txt: [B, D] unit-norm; scale: the fixed multiplier; k, a, b: the sigmoids' slope and centres
    (radians). Per-sample values [B] can be negative. Returns the mean, sum or per-sample values.
    """
    options = _checked(SFaceOptions(scale, k, a, b, inter_reduction))
    return SFace(options).evaluate(img, txt, scale, group_ids=group_ids, reduction=reduction)


# --------------------------------------------------------------------------------------------
# SphereFace2

SPHEREFACE2_VARIANTS = ("C", "A", "M")


def sphereface2_bias_init(batch_size: int, lam: float, t: float, margin: float, r: float,
                          variant: str = "C") -> float:
    """The bias minimising SphereFace2's row loss for ``batch_size`` candidates at cosine 0 (SphereFace2, ICLR 2022).

    One positive and ``B − 1`` negatives at ``θ = π/2`` (the angle of random high-dimensional
    features): ``b* = argmin λ·softplus(−(p + b)) + (1−λ)(B−1)·softplus(n + b)`` with p, n the
    positive's and a negative's ``r·g(·)`` offsets; for λ = ½, t = 1, m = 0 it is ``−log(B − 1)``.
    """
    if batch_size < 2 or not 0 < lam < 1 or not r > 0 or variant not in SPHEREFACE2_VARIANTS:
        raise ValueError(f"batch_size={batch_size} must be >= 2, lam={lam} in (0, 1), r={r} > 0, "
                         f"variant={variant!r} one of {SPHEREFACE2_VARIANTS}")

    def g(x: float) -> float:
        return 2 * ((1 + x) / 2) ** t - 1

    if variant == "C":
        positive, negative = r * (g(0.0) - margin), r * (g(0.0) + margin)
    else:
        angle = math.pi / 2 + margin if variant == "A" else margin * math.pi / 2
        positive, negative = r * g(math.cos(min(angle, math.pi))), r * g(0.0)
    return row_loss_bias(batch_size, lam, positive, negative)


@dataclass(frozen=True)
class SphereFace2Options(TermOptions):
    lam: float = 0.7  # weight of the positives' term; face: 0.7
    margin: float = 0.1  # face: 0.4 (C); variant M takes a factor >= 1
    t: float = 1.0  # g(x) = 2((x+1)/2)^t − 1, t = 1 the identity; face: 3
    variant: str = "C"
    detach: bool = True  # SphereFace2 trains with CGD

    def check(self) -> list[str]:
        problems = [] if 0 < self.lam < 1 else [f"lam={self.lam} must be in (0, 1)"]
        if not self.t >= 1:
            problems.append(f"t={self.t} must be >= 1 (t < 1 has an infinite slope at antipodal pairs)")
        if self.variant not in SPHEREFACE2_VARIANTS:
            problems.append(f"variant={self.variant!r} must be one of {SPHEREFACE2_VARIANTS}")
        elif self.variant == "M" and not 1 <= self.margin < 1e3:
            problems.append(f"margin={self.margin} must be >= 1 for variant 'M' (a multiplicative margin)")
        elif self.variant != "M" and not 0 <= self.margin < math.pi:
            problems.append(f"margin={self.margin} must be in [0, π) for variant {self.variant!r}")
        return problems


@register_term
class SphereFace2(MarginTerm):
    """Binary one-vs-all classification (SphereFace2, Wen et al., ICLR 2022) across modalities.

    ``g(x) = 2((x+1)/2)^t − 1``, r = s. Positives ``z = r(g(C) − m) + b`` (C), ``r·g(cos(min(θ+m, π))) + b``
    (A), ``r·g(cos(min(mθ, π))) + b`` (M); negatives ``r(g(C) + m) + b`` (C), else ``r·g(C) + b``. Per
    direction ``(1/sg[r])[λ Σ_P softplus(−z) + (1−λ) Σ_N softplus(z)]``; λ = ½, t = 1, m = 0 is
    ``siglip / (2r)``. CGD on by default, as the paper trains it.
    """

    name = "sphereface2"
    description = "binary one-vs-all margin loss (SphereFace2, ICLR'22)"
    Options = SphereFace2Options
    needs_logit_bias = True

    @classmethod
    def model_starts(cls, options: TermOptions, *, batch_size: int, logit_scale: float) -> dict[str, float]:
        """b at the row loss's minimiser for the global batch and the initial r (:func:`sphereface2_bias_init`)."""
        return {"init_logit_bias": sphereface2_bias_init(batch_size, options.lam, options.t, options.margin,
                                                         logit_scale, options.variant)}

    def positive(self, cosine: Tensor, batch: MarginBatch) -> Tensor:
        options = self.options
        if options.variant == "C":
            return _power_activation(cosine, options.t, batch.eps) - options.margin
        theta = batch.theta(cosine)
        angle = theta + options.margin if options.variant == "A" else theta * options.margin
        return _power_activation(torch.cos(angle.clamp(max=math.pi)), options.t, batch.eps)

    def negative(self, cosine: Tensor, batch: MarginBatch) -> Tensor | None:
        options = self.options
        if options.variant == "C" and options.margin != 0:
            return _power_activation(cosine, options.t, batch.eps) + options.margin
        return None if options.t == 1 else _power_activation(cosine, options.t, batch.eps)

    def per_sample(self, batch: MarginBatch) -> Tensor:
        if batch.logit_bias is None:
            raise ValueError("sphereface2 needs logit_bias (the model's learnable bias b)")
        lam, scale, bias = self.options.lam, batch.scale, batch.logit_bias

        def logits_of(cosine: Tensor) -> Tensor:
            return scale * self.transformed(cosine, batch) + bias

        def sums(logits: Tensor, dims: tuple[int, ...]) -> list[Tensor]:
            """The row loss's sums over ``dims`` of one [r, N] logit matrix."""
            if batch.positives is None:
                # softplus(z) everywhere, then the diagonal's λ·softplus(−z) in place of (1−λ)·softplus(z)
                negatives = F.softplus(logits)
                diagonal = logits.diagonal(batch.offset)
                correction = lam * F.softplus(-diagonal) - (1 - lam) * F.softplus(diagonal)
                return [(1 - lam) * negatives.sum(dim=dim) + correction for dim in dims]
            # softplus(−z) on the positives computed as such, not as softplus(z) − z, which cancels
            losses = F.softplus(torch.where(batch.positives, -logits, logits))
            weighted = torch.where(batch.positives, lam * losses, (1 - lam) * losses)
            return [weighted.sum(dim=dim) for dim in dims]

        if batch.text_rows is None:
            # the whole batch: transforms entry-wise, P symmetric, so the text rows are the column sums
            rows, columns = sums(logits_of(batch.image_rows), (1, 0))
        else:
            (rows,), (columns,) = sums(logits_of(batch.image_rows), (1,)), sums(logits_of(batch.text_rows), (1,))
        return 0.5 * (rows + columns) / scale.detach()


def sphereface2_loss(
    img: Tensor,
    txt: Tensor,
    logit_scale: float | Tensor,
    logit_bias: float | Tensor,
    lam: float = SphereFace2Options.lam,
    margin: float = SphereFace2Options.margin,
    t: float = SphereFace2Options.t,
    variant: str = "C",
    group_ids: Tensor | None = None,
    reduction: str = "mean",
    detach: bool = True,
) -> Tensor:
    """SphereFace2 (ICLR 2022) across modalities: binary one-vs-all with margin m, variants C, A, M.

    img, txt: [B, D] unit-norm; logit_scale: r; logit_bias: b (start: :func:`sphereface2_bias_init`).
    λ = ½, t = 1, m = 0 equals ``siglip_loss / (2r)``. Returns the mean, sum or per-sample losses [B].
    """
    options = _checked(SphereFace2Options(lam, margin, t, variant, detach))
    return SphereFace2(options).evaluate(img, txt, logit_scale, group_ids=group_ids, reduction=reduction,
                                         logit_bias=logit_bias)
