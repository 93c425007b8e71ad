"""Objective terms: one definition per term, registered by name, evaluated on shared similarities.

A term is a subclass of :class:`Term` decorated with :func:`register_term`. It names itself,
declares its config fields (a frozen dataclass ``Options`` with defaults and a ``check``), the
random draws it needs (:meth:`Term.draw`), the model state it needs (``needs_logit_bias``) and
how that state starts when the config leaves it unset (``model_defaults``), and computes its
value from a :class:`TermContext`, which builds each shared matrix (the image–text logits, the Gram
matrices, the same-group mask) at most once per objective call, in global and in ``local_loss``
mode alike. A *contrastive* term returns the per-sample losses of this process's
samples, which the sample weights act on (see :mod:`mmsphere.losses.reducers`); any other term
returns its scalar value, already normalised so that its average over ranks is the global value.

Config (``loss.terms``): ``{angular_margin: {weight: 1.0, margin: 0.1}, m2mix: 0.1}``; a bare
number is the weight with default fields. Exactly one contrastive term per objective.

A user's own term, in the user's module::

    from mmsphere.losses import Term, TermOptions, register_term

    @register_term
    class Alignment(Term):
        name = "alignment"
        description = "mean squared distance of the positive pairs (Wang & Isola 2020)"

        def forward(self, context):
            return context.scaled_sum(2 - 2 * context.positive_cosine)

and in the YAML config ``loss: {terms: {angular_margin: 1.0, alignment: 0.1}, imports: [my_module]}``.
"""

from __future__ import annotations

import abc
import dataclasses
import difflib
import inspect
import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from mmsphere.errors import ConfigError
from mmsphere.models.config import ModelConfig
from mmsphere.losses.numerics import (_as_scale, _check_pair, _margin_cosine, _positive_mask, _slerp_weights, _upcast,
                                      row_loss_bias)

__all__ = ["Term", "TermOptions", "TermContext", "TERMS", "register_term", "resolve_terms", "ResolvedTerm",
           "evaluate_on_batch"]


# --------------------------------------------------------------------------------------------
# the registry


@dataclass(frozen=True)
class TermOptions:
    """A term's config fields besides its weight (none by default); ``check`` lists the problems."""

    def check(self) -> list[str]:
        """Problems with the values, each phrased ``field=value must ...``."""
        return []


class Term(abc.ABC):
    """One objective term. Subclasses set the class attributes and implement :meth:`forward`."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    default_weight: ClassVar[float] = 1.0
    contrastive: ClassVar[bool] = False  # returns per-sample losses [n] that sample weights act on
    needs_logit_bias: ClassVar[bool] = False
    # reads context.image_norms / text_norms (the features' norms before L2 normalisation); a property
    # where it depends on the options
    needs_feature_norms: ClassVar[bool] = False
    # model.<field> -> the value this term starts it at when the config leaves the field unset (null):
    # how the model state it needs is created (``init_logit_bias``) or where it starts (``init_logit_scale``);
    # an explicit setting wins. Starts that depend on the batch or the scale: override model_starts.
    model_defaults: ClassVar[dict[str, float]] = {}
    Options: ClassVar[type[TermOptions]] = TermOptions

    def __init__(self, options: TermOptions) -> None:
        self.options = options

    @classmethod
    def model_starts(cls, options: TermOptions, *, batch_size: int, logit_scale: float) -> dict[str, float]:
        """model.<field> -> this term's start for it, for a global batch of ``batch_size`` and the initial multiplier.

        ``logit_scale`` is the multiplier s the model starts at (not its log). A term that needs the
        logit bias declares its start here (e.g. the minimiser of its row loss at the initial
        angles); one that declares none makes the config set ``model.init_logit_bias``.
        """
        return dict(cls.model_defaults)

    def draw(self, rng: np.random.Generator, batch_size: int) -> Any:
        """This term's random draws for one call (the same on every rank); None when it has none."""
        return None

    @abc.abstractmethod
    def forward(self, context: TermContext) -> Tensor:
        """Per-sample losses of this rank's rows [r] (contrastive), else the scalar value."""

    def weight_input(self, context: TermContext, per_sample: Tensor) -> Tensor:
        """What a sample-weighting network reads of each row [r], detached: the per-sample loss itself.

        A contrastive term whose per-sample values are not losses on a common scale (SFace's can be
        negative and scale with its fixed s) returns another per-sample difficulty here.
        """
        return per_sample.detach()


TERMS: dict[str, type[Term]] = {}


def register_term(cls: type[Term]) -> type[Term]:
    """Class decorator: make ``cls`` usable from a config as ``loss.terms.<cls.name>``."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name.isidentifier():
        raise TypeError(f"{cls.__name__}.name must be an identifier string, got {name!r}")
    if inspect.isabstract(cls):
        raise TypeError(f"term {name!r} ({cls.__name__}) must implement forward(context)")
    if not (dataclasses.is_dataclass(cls.Options) and issubclass(cls.Options, TermOptions)):
        raise TypeError(f"{cls.__name__}.Options must be a dataclass subclassing TermOptions")
    if "weight" in {field.name for field in dataclasses.fields(cls.Options)}:
        raise TypeError(f"{cls.__name__}.Options must not declare 'weight': every term has one")
    unsettable = [key for key in cls.model_defaults if key not in _UNSET_MODEL_FIELDS]
    if unsettable:
        raise TypeError(f"{cls.__name__}.model_defaults: {unsettable[0]!r} is not a model config field that "
                        f"defaults to null ({', '.join(_UNSET_MODEL_FIELDS)})")
    if name in TERMS and TERMS[name] is not cls:
        raise ValueError(f"a term named {name!r} is already registered ({TERMS[name].__qualname__})")
    TERMS[name] = cls
    return cls


# the model config fields a term may give a default to: the starts of the model's learnable state
# (open_clip's init_* model arguments), null unless the config sets them
_UNSET_MODEL_FIELDS = tuple(field.name for field in dataclasses.fields(ModelConfig)
                            if field.name.startswith("init_") and field.default is None)


@dataclass(frozen=True)
class ResolvedTerm:
    """A term of a config, with its weight and checked options."""

    name: str
    weight: float
    options: TermOptions

    @property
    def term_class(self) -> type[Term]:
        return TERMS[self.name]

    def build(self) -> Term:
        return self.term_class(self.options)


def resolve_terms(terms: dict[str, Any]) -> list[ResolvedTerm]:
    """Check ``loss.terms`` against the registry and return each term's weight and options, in registry order."""
    if not isinstance(terms, dict) or not terms:
        raise ConfigError(f"loss.terms must be a non-empty mapping of term names, got {terms!r}")
    resolved = []
    for name, entry in terms.items():
        if name not in TERMS:
            close = difflib.get_close_matches(str(name), list(TERMS), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"loss.terms: unknown term {name!r}{hint} (known: {', '.join(TERMS)})")
        term_class = TERMS[name]
        fields = {field.name: field for field in dataclasses.fields(term_class.Options)}
        values = dict(entry) if isinstance(entry, dict) else {"weight": entry}
        unknown = [key for key in values if key != "weight" and key not in fields]
        if unknown:
            close = difflib.get_close_matches(str(unknown[0]), list(fields) + ["weight"], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"loss.terms.{name}: unknown field {unknown[0]!r}{hint} "
                              f"(fields: {', '.join(['weight', *fields])})")
        weight = values.pop("weight", term_class.default_weight)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (math.isfinite(weight) and weight >= 0):
            raise ConfigError(f"loss.terms.{name}.weight={weight!r} must be a finite number >= 0")
        options = term_class.Options(**{key: _typed(fields[key], value, f"loss.terms.{name}.{key}")
                                        for key, value in values.items()})
        problems = options.check()
        if problems:
            raise ConfigError(f"loss.terms.{name}.{problems[0]}")
        resolved.append(ResolvedTerm(name, float(weight), options))
    contrastive = [term.name for term in resolved if term.term_class.contrastive]
    if len(contrastive) != 1:
        choices = [name for name, term_class in TERMS.items() if term_class.contrastive]
        raise ConfigError(f"loss.terms must hold exactly one contrastive term of {choices}, got {contrastive or 'none'}")
    order = list(TERMS)
    return sorted(resolved, key=lambda term: order.index(term.name))


def _typed(field: dataclasses.Field, value: Any, key: str) -> Any:
    """``value`` as the field's declared scalar type (int → float allowed), or a ConfigError naming the key."""
    declared = field.type if isinstance(field.type, type) else {"float": float, "int": int, "bool": bool,
                                                                 "str": str}.get(str(field.type))
    if declared is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if declared is not None and not isinstance(value, declared):
        raise ConfigError(f"{key}={value!r} must be of type {declared.__name__}")
    return value


# --------------------------------------------------------------------------------------------
# what every term reads: this rank's rows against the columns of the whole batch


@dataclass
class Rows:
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


class TermContext:
    """The shared inputs of one objective call; each matrix is built on first use and kept."""

    def __init__(self, rows: Rows, scale: Tensor, input_dtype: torch.dtype, draws: dict[str, Any],
                 logit_bias: Tensor | None = None, group_ids: Tensor | None = None, *, step: int | None = None,
                 image_norms: Tensor | None = None, text_norms: Tensor | None = None) -> None:
        self.rows = rows
        self.scale = scale  # the logit multiplier s
        self.input_dtype = input_dtype  # of the features before upcasting (sets the arccos clamp)
        self.draws = draws  # term name -> its draw
        self.logit_bias = logit_bias
        self.group_ids = group_ids  # [N] of the whole batch, or None: every sample its own group
        # the training step (the same on every rank; None outside training), for schedules
        self.step = step
        # [N] norms of the whole batch's features before L2 normalisation, gathered with their gradient
        # like the features; passed only when a term declares needs_feature_norms
        self.image_norms = image_norms
        self.text_norms = text_norms

    @property
    def offset(self) -> int:
        return self.rows.offset

    @cached_property
    def logits(self) -> Tensor:
        """``s⟨img_i, txt_j⟩`` [r, N]; s scales the [r, D] rows rather than the [r, N] product."""
        return (self.scale * self.rows.image) @ self.rows.all_text.T

    @cached_property
    def logits_t(self) -> Tensor:
        """``s⟨txt_i, img_j⟩`` [r, N]."""
        if self.rows.is_global:
            # a contiguous transposed copy: element-wise kernels and log_softmax on a transposed view
            # run several times slower than on contiguous rows
            return self.logits.T.contiguous()
        return (self.scale * self.rows.text) @ self.rows.all_image.T

    @cached_property
    def positive_cosine(self) -> Tensor:
        """``⟨img_i, txt_i⟩`` of the rows [r]."""
        return (self.rows.image * self.rows.text).sum(dim=1)

    @cached_property
    def pair_cosine(self) -> Tensor:
        """``⟨img_j, txt_j⟩`` of every pair of the batch [N]."""
        return (self.rows.all_image * self.rows.all_text).sum(dim=1)

    @cached_property
    def gram_image(self) -> Tensor:
        """``⟨img_i, img_j⟩`` [r, N]."""
        return _gram(self.rows.image) if self.rows.is_global else self.rows.image @ self.rows.all_image.T

    @cached_property
    def gram_text(self) -> Tensor:
        """``⟨txt_i, txt_j⟩`` [r, N]."""
        return _gram(self.rows.text) if self.rows.is_global else self.rows.text @ self.rows.all_text.T

    @cached_property
    def same_group(self) -> Tensor | None:
        """[r, N] bool: column j is a positive of row i; None when every sample is its own group."""
        if self.group_ids is None:
            return None
        rows = self.group_ids[self.offset:self.offset + self.rows.image.shape[0]]
        return rows[:, None] == self.group_ids[None, :]

    def positive_mean_log_softmax(self, logits: Tensor) -> Tensor:
        """Mean of ``log_softmax(logits, dim=1)`` over each row's positives [r] (the diagonal alone by default)."""
        log_probabilities = torch.log_softmax(logits, dim=1)
        if self.same_group is None:
            return log_probabilities.diagonal(self.offset)
        mask = self.same_group
        # where, not a product with the mask: a −inf log-probability off the positives would give NaN
        return torch.where(mask, log_probabilities, 0.0).sum(dim=1) / mask.sum(dim=1)

    def with_positive_margin(self, logits: Tensor, margin: float) -> Tensor:
        """``logits`` with every positive ``s⟨·,·⟩`` replaced by ``s·cos(θ − m)``."""
        positive = self.scale * _margin_cosine(self.positive_cosine, margin, self.input_dtype)
        if self.same_group is not None:
            # the margin is evaluated on every entry and kept on the positives; the clamp keeps arccos and
            # its gradient finite on the discarded entries too, so torch.where leaks no NaN backwards
            cosine = logits / self.scale
            logits = torch.where(self.same_group, self.scale * _margin_cosine(cosine, margin, self.input_dtype), logits)
        # a sample's own pair reads its cosine directly, grouped or not, so all-distinct group ids give
        # exactly the single-positive values
        return torch.diagonal_scatter(logits, positive, self.offset)

    def scaled_sum(self, per_row: Tensor) -> Tensor:
        """The global mean of a per-row quantity [r] (local mode: this rank's share of it)."""
        return self.rows.rank_factor * per_row.sum() / self.rows.total


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

    @staticmethod
    def jvp(ctx, tangent: Tensor) -> Tensor:  # type: ignore[override]
        (features,) = ctx.saved_tensors
        product = tangent @ features.T
        return product + product.T


# --------------------------------------------------------------------------------------------
# the built-in terms (ARCHITECTURE.md, Objective); each is also a function of mmsphere.losses.functional,
# which evaluates it on one whole batch


@register_term
class Clip(Term):
    """Symmetric InfoNCE (CLIP): ``ℓ_i = ½[CE_P(L)_i + CE_P(Lᵀ)_i]``, P the positives of row i."""

    name = "clip"
    description = "symmetric InfoNCE (CLIP)"
    contrastive = True

    def forward(self, context: TermContext) -> Tensor:
        return -0.5 * (context.positive_mean_log_softmax(context.logits)
                       + context.positive_mean_log_softmax(context.logits_t))


@dataclass(frozen=True)
class MarginOptions(TermOptions):
    margin: float = 0.1

    def check(self) -> list[str]:
        return [] if 0 <= self.margin < math.pi else [f"margin={self.margin} must be in [0, π)"]


@register_term
class AngularMargin(Term):
    """Subtractive angular margin on the positive logits (MAMA, ECCV 2024)."""

    name = "angular_margin"
    description = "subtractive angular margin (MAMA, ECCV'24)"
    contrastive = True
    Options = MarginOptions

    def forward(self, context: TermContext) -> Tensor:
        margin = self.options.margin
        return -0.5 * (context.positive_mean_log_softmax(context.with_positive_margin(context.logits, margin))
                       + context.positive_mean_log_softmax(context.with_positive_margin(context.logits_t, margin)))


@dataclass(frozen=True)
class SiglipOptions(TermOptions):
    margin: float = 0.0

    def check(self) -> list[str]:
        return [] if 0 <= self.margin < math.pi else [f"margin={self.margin} must be in [0, π)"]


@register_term
class Siglip(Term):
    """Pairwise sigmoid loss (SigLIP, ICCV 2023) with an optional angular margin on the positives (MAMA).

    ``ℓ_i = −½[Σ_j log σ(z_ij L_ij) + Σ_j log σ(z_ji L_ji)]``, ``L_ij = s⟨img_i, txt_j⟩ + b``,
    ``z = +1`` on positives (the margin applied there), −1 elsewhere.
    """

    name = "siglip"
    description = "pairwise sigmoid loss with optional angular margin (SigLIP, ICCV'23)"
    contrastive = True
    needs_logit_bias = True
    # open_clip's start for SigLIP's scale (open_clip_train --siglip, as in the paper): s = 10; the bias
    # at its row loss's minimiser (model_starts); a pretrained checkpoint's own values replace them
    model_defaults = {"init_logit_scale": math.log(10.0)}
    Options = SiglipOptions

    @classmethod
    def model_starts(cls, options: TermOptions, *, batch_size: int, logit_scale: float) -> dict[str, float]:
        """s = 10 and b minimising the row loss of B candidates at θ = π/2: ``−log(B − 1)`` without margin.

        The paper's b = −10 is this minimiser at B ≈ 22k; at fine-tuning batch sizes −10 would start
        every positive near σ = 0 and spend the first steps moving b.
        """
        positive = logit_scale * math.sin(options.margin)  # s·cos(π/2 − m)
        return {**cls.model_defaults, "init_logit_bias": row_loss_bias(batch_size, 0.5, positive, 0.0)}

    def forward(self, context: TermContext) -> Tensor:
        # log σ(z·L) = log σ(−L) + [z = +1]·L, since log σ(x) − log σ(−x) = x: one logsigmoid over the
        # matrix and a sum over the positives, no sign matrix
        margin = self.options.margin
        logits = context.logits if margin == 0 else context.with_positive_margin(context.logits, margin)
        logits = logits + context.logit_bias
        negatives = torch.nn.functional.logsigmoid(-logits)
        if context.rows.is_global:
            # L_ji of the columns is the transposed matrix: its row sums are these column sums
            rows = self._row_sums(negatives, logits, context)
            columns = negatives.sum(dim=0) + self._positive_sums(logits, context, dim=0)
            return -0.5 * (rows + columns)
        logits_t = context.logits_t if margin == 0 else context.with_positive_margin(context.logits_t, margin)
        logits_t = logits_t + context.logit_bias
        columns = self._row_sums(torch.nn.functional.logsigmoid(-logits_t), logits_t, context)
        return -0.5 * (self._row_sums(negatives, logits, context) + columns)

    def _row_sums(self, negatives: Tensor, logits: Tensor, context: TermContext) -> Tensor:
        return negatives.sum(dim=1) + self._positive_sums(logits, context, dim=1)

    @staticmethod
    def _positive_sums(logits: Tensor, context: TermContext, dim: int) -> Tensor:
        if context.same_group is None:
            return logits.diagonal(context.offset)
        return (logits * context.same_group).sum(dim=dim)


@dataclass(frozen=True)
class M2MixOptions(TermOptions):
    alpha: float = 0.5  # λ ~ Beta(α, α), one draw per batch
    tau: float = 0.07

    def check(self) -> list[str]:
        return [f"{key}={getattr(self, key)} must be > 0" for key in ("alpha", "tau") if not getattr(self, key) > 0]


@register_term
class M2Mix(Term):
    """Geodesic multimodal mixup hard negatives (m²-mix, NeurIPS 2023)."""

    name = "m2mix"
    description = "geodesic multimodal mixup negatives (m²-mix, NeurIPS'23)"
    default_weight = 0.1
    Options = M2MixOptions

    def draw(self, rng: np.random.Generator, batch_size: int) -> float:
        return float(rng.beta(self.options.alpha, self.options.alpha))

    def forward(self, context: TermContext) -> Tensor:
        return context.scaled_sum(self.per_sample(context))

    def per_sample(self, context: TermContext) -> Tensor:
        """``½[CE(P_img/τ)_i + CE(P_txt/τ)_i]`` of this rank's rows [r]."""
        # n_j = slerp(img_j, txt_j, λ) = a_j·img_j + b_j·txt_j, so ⟨x_i, n_j⟩ = a_j⟨x_i, img_j⟩ + b_j⟨x_i, txt_j⟩
        # reuses the logits and Gram matrices instead of building the mixed points
        rows, scale, tau = context.rows, context.scale, self.options.tau
        logits, logits_t = context.logits, context.logits_t
        lam = torch.as_tensor(context.draws[self.name], dtype=logits.dtype, device=logits.device)
        weight_image, weight_text = _slerp_weights(context.pair_cosine, lam)
        weight_image, weight_text = weight_image / tau, weight_text / tau
        mixed_image = torch.addcmul(logits * (weight_text / scale), context.gram_image, weight_image)
        mixed_text = torch.addcmul(context.gram_text * weight_text, logits_t, weight_image / scale)
        positive = context.positive_cosine / tau
        mixed_image.diagonal(rows.offset).copy_(positive)
        mixed_text.diagonal(rows.offset).copy_(positive)
        return -0.5 * (torch.log_softmax(mixed_image, dim=1).diagonal(rows.offset)
                       + torch.log_softmax(mixed_text, dim=1).diagonal(rows.offset))


@dataclass(frozen=True)
class CalibratedUniformityOptions(TermOptions):
    t: float = 2.0
    alpha: float = 0.5  # p_i ~ Beta(α, α) per sample for the fused features
    min_sim: float = 0.0
    max_sim: float = 0.8
    detach_calibration: bool = True

    def check(self) -> list[str]:
        problems = [f"{key}={getattr(self, key)} must be > 0" for key in ("t", "alpha") if not getattr(self, key) > 0]
        if not -1 <= self.min_sim <= self.max_sim <= 1:
            problems.append(f"min_sim={self.min_sim}, max_sim={self.max_sim} must satisfy -1 <= min_sim <= max_sim <= 1")
        return problems


@register_term
class CalibratedUniformity(Term):
    """Calibrated uniformity on both modalities (CM³, 2025): ``½[cu(img, S) + cu(txt, S)]``."""

    name = "calibrated_uniformity"
    description = "calibrated uniformity on both modalities (CM³, 2025)"
    default_weight = 0.1
    Options = CalibratedUniformityOptions

    def draw(self, rng: np.random.Generator, batch_size: int) -> np.ndarray:
        return rng.beta(self.options.alpha, self.options.alpha, size=batch_size)

    def forward(self, context: TermContext) -> Tensor:
        options, rows, scale = self.options, context.rows, context.scale
        logits, logits_t, gram_image, gram_text = context.logits, context.logits_t, context.gram_image, context.gram_text
        two_t = 2 * options.t
        # For unit rows the exponents 2t(⟨x_i, x_j⟩ − S_ij) lie in [2t(−1 − max_sim), 2t(1 − min_sim)], so
        # the upper bound serves as log-sum-exp shift unless the range is wide enough to underflow exp.
        shift = two_t * (1 - options.min_sim)
        fixed_shift = two_t * (2 + options.max_sim - options.min_sim) < 80
        lam = torch.as_tensor(context.draws[self.name], dtype=gram_image.dtype, device=gram_image.device)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not options.detach_calibration):
            weight_image, weight_text = _slerp_weights(context.pair_cosine, lam)
            # −2t·S_ij directly: the factor rides on the row weights (−2t·clamp(f) = clamp(−2t·f) flipped)
            row_weight_image = -two_t * weight_image[rows.offset:rows.offset + rows.image.shape[0], None]
            row_weight_text = -two_t * weight_text[rows.offset:rows.offset + rows.image.shape[0], None]
            # fused f_j = a_j·img_j + b_j·txt_j, so ⟨f_i, f_j⟩ = a_i⟨img_i, f_j⟩ + b_i⟨txt_i, f_j⟩
            # combines the blocks already computed instead of another matmul
            image_to_fused = torch.addcmul(logits * (weight_text / scale), gram_image, weight_image)
            text_to_fused = torch.addcmul(gram_text * weight_text, logits_t, weight_image / scale)
            base = torch.addcmul(image_to_fused * row_weight_image, text_to_fused, row_weight_text)
            base = base.clamp(-two_t * options.max_sim, -two_t * options.min_sim)
            if fixed_shift:
                base = base.sub_(shift)
            # ⟨x_i, x_j⟩ and S_ij are symmetric, so the mean over pairs i < j is the mean over all i ≠ j:
            # only the diagonal is masked (and every rank's row block holds as many pairs in local mode)
            base.diagonal(rows.offset).fill_(-math.inf)
        shift = shift if fixed_shift else None
        return 0.5 * (self.log_mean_exp(base, gram_image, two_t, shift, rows)
                      + self.log_mean_exp(base, gram_text, two_t, shift, rows))

    @staticmethod
    def log_mean_exp(base: Tensor, gram: Tensor, two_t: float, shift: float | None, rows: Rows) -> Tensor:
        """``log mean_{i≠j} exp(base_ij + 2t⟨x_i, x_j⟩)`` over the whole batch: one modality's calibrated uniformity.

        base: [r, N] the exponents' calibration part ``−2t·S_ij``, −inf on the diagonal, less ``shift``
        when one is given; gram: [r, N] ``⟨x_i, x_j⟩``; shift: an upper bound of the exponents already
        taken off ``base``, or None (their maximum is taken off here). ``−t(‖x_i − x_j‖² − 2 + 2·S_ij) = 2t(⟨x_i, x_j⟩ − S_ij)`` for unit rows, and for a
        symmetric S the mean over i ≠ j is the mean over i < j (CM³'s definition); the gradient lacks
        only the radial part that L2 normalisation removes.
        """
        exponents = torch.add(base, gram, alpha=two_t)
        if shift is None:
            shift = exponents.detach().amax()
            exponents = exponents.sub_(shift)
        log_sum = exponents.exp_().sum().log() + shift
        if not rows.is_global:
            import mmsphere.losses.distributed as distributed

            # log Σ over all pairs = LSE of every rank's partial log-sum; the gather carries the gradient
            log_sum = torch.logsumexp(distributed.all_gather_with_grad(log_sum.reshape(1)), dim=0)
        return log_sum - math.log(rows.total * (rows.total - 1))


@register_term
class CrossModalAlignment(Term):
    """Cross-modal alignment regulariser (CMA, CVPR 2025): ``−½[mean_k LSE_j L_kj + mean_k LSE_j L_jk]``."""

    name = "cma"
    description = "cross-modal alignment regulariser (CMA, CVPR'25)"
    default_weight = 0.001

    def forward(self, context: TermContext) -> Tensor:
        return context.scaled_sum(self.per_sample(context))

    def per_sample(self, context: TermContext) -> Tensor:
        """``−½[LSE_j L_kj + LSE_j L_jk]`` of this rank's rows [r]."""
        # LSE_i = L_ii − log_softmax(L)_ii, exact also when the positive dominates the row
        logits, logits_t, offset = context.logits, context.logits_t, context.offset
        plain_positive = logits.diagonal(offset)
        return -0.5 * ((plain_positive - torch.log_softmax(logits, dim=1).diagonal(offset))
                       + (plain_positive - torch.log_softmax(logits_t, dim=1).diagonal(offset)))


def upcast_rows(image: Tensor, text: Tensor) -> tuple[Tensor, Tensor]:
    """Half-precision features in fp32 (see :mod:`mmsphere.losses.numerics`), others unchanged."""
    return _upcast(image), _upcast(text)


# --------------------------------------------------------------------------------------------
# a term on one whole batch: what the functions of mmsphere.losses.functional are


def evaluate_on_batch(term: Term, img: Tensor, txt: Tensor, logit_scale: float | Tensor, *,
                      logit_bias: float | Tensor | None = None, group_ids: Tensor | None = None, draw: Any = None,
                      per_sample: bool = True) -> Tensor:
    """``term`` on one batch held by one process: per-sample values [B] (``per_sample``), else its value.

    img, txt: [B, D] unit-norm, any float dtype (half precision is computed in fp32); logit_scale: the
    multiplier s; logit_bias: b, for terms that read it; group_ids: optional [B] integers, samples of
    one group are positives of each other; draw: the term's random draw (m²-mix's λ). A non-contrastive
    term gives per-sample values through its ``per_sample`` method.
    """
    _check_pair(img, txt)
    _positive_mask(group_ids, img)  # checks the ids
    image, text = _upcast(img), _upcast(txt)
    rows = Rows(image, text, image, text, 0, [img.shape[0]], 0, True)
    scale = _as_scale(logit_scale, image)
    bias = None if logit_bias is None else _as_scale(logit_bias, image, name="logit_bias")
    context = TermContext(rows, scale, img.dtype, {term.name: draw}, bias, group_ids)
    if not per_sample or term.contrastive:
        return term.forward(context)
    return term.per_sample(context)  # type: ignore[attr-defined]
