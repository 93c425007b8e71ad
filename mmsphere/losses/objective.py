"""The composed training objective: registered terms over shared similarities, reduced with sample weights.

``loss = w_c·R(ℓ, v) + Σ_k w_k·term_k`` (ARCHITECTURE.md, Objective): ``ℓ`` the per-sample losses of the
one contrastive term (``clip``, ``angular_margin`` or ``siglip``), ``v`` the sample weights (``v ≡ 1``
without meta weighting), R the reducer of :mod:`mmsphere.losses.reducers`, and the other terms
(m²-mix, calibrated uniformity, CMA, or a user's) as registered in :mod:`mmsphere.losses.terms`.
Nothing here names a term: :class:`Objective` reads the registry.

:meth:`Objective.evaluate` returns the unreduced per-sample losses and the other terms' values;
:meth:`Objective.reduce` turns them and the weights into the loss; calling the objective does both.

Random draws (per active term in registry order: the m²-mix λ, then one calibration ``p_i`` per
sample of the whole global batch) come from ``numpy.random.default_rng(seed)``, so every rank draws
the same values.

Under several processes (see :mod:`mmsphere.losses.distributed`) the objective receives the
LOCAL batch and all-gathers features itself. Global mode: every rank evaluates all rows of the
global batch. ``local_loss``: rank r evaluates the rows of its own samples against all columns;
row-wise terms are local sums scaled so that their average over ranks is the global value, and
calibrated uniformity, the log of a mean over all pairs, combines every rank's partial log-sum
through a differentiable gather. In both modes the gradients, after DDP's averaging over ranks,
equal those of one process on the concatenated batch (second-order gradients and forward-mode
tangents of the meta step included), and the returned ``loss`` and ``terms`` hold the global values
on every rank, so all ranks take the same decision on a non-finite step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from mmsphere.errors import ConfigError
import mmsphere.losses.distributed as distributed
from mmsphere.losses.config import LossConfig
from mmsphere.losses.numerics import _as_scale, _upcast
from mmsphere.losses.reducers import NORMALIZATIONS, reduce_weighted
from mmsphere.losses.terms import ResolvedTerm, Rows, Term, TermContext, resolve_terms

__all__ = ["Objective", "ObjectiveOutput", "ObjectiveTerms", "SampleWeights"]

SampleWeights = Tensor | Callable[[Tensor], Tensor] | None


@dataclass
class ObjectiveOutput:
    """What one objective call returns: the loss to backpropagate, its terms for logging, per-sample losses."""

    loss: Tensor  # scalar, with graph
    terms: dict[str, Tensor]  # detached values: one per active term (before its config weight) and "total"
    per_sample: Tensor  # [n] contrastive losses of the local samples, with graph
    weights: Tensor | None = None  # [n] the sample weights used (detached), None without weights


@dataclass
class ObjectiveTerms:
    """The unreduced result of :meth:`Objective.evaluate`."""

    rows: Rows
    per_sample_rows: Tensor  # [r] contrastive losses of the rows this rank evaluated, with graph
    regularizers: dict[str, Tensor]  # the other active terms' values (before their weights), with graph
    weight_input_rows: Tensor | None = None  # [r] what a weighting network reads, detached (the contrastive term's)

    @property
    def per_sample(self) -> Tensor:
        """[n] contrastive losses of this process's samples, with graph (what sample weights act on)."""
        return self.per_sample_rows[self.rows.local]

    @property
    def weight_input(self) -> Tensor:
        """[n] what a sample-weighting network reads of this process's samples (``Term.weight_input``), detached."""
        rows = self.per_sample_rows if self.weight_input_rows is None else self.weight_input_rows
        return rows[self.rows.local].detach()


class Objective(nn.Module):
    """The composed objective of a :class:`~mmsphere.losses.config.LossConfig`; no learnable parameters."""

    def __init__(self, config: LossConfig) -> None:
        super().__init__()
        if config.local_loss and not config.gather_with_grad:
            raise ConfigError("loss.local_loss=true needs loss.gather_with_grad=true: without gradients through the "
                              "gather each rank misses the other ranks' terms and the result is not the global loss")
        self.config = config
        resolved = resolve_terms(config.terms)
        # zero-weight extra terms are not evaluated (nor do they draw); the contrastive one always is
        self.resolved: list[ResolvedTerm] = [term for term in resolved
                                             if term.term_class.contrastive or term.weight > 0]
        self.terms: dict[str, Term] = {term.name: term.build() for term in self.resolved}
        self.term_weights = {term.name: term.weight for term in self.resolved}
        self.contrastive = next(term.name for term in self.resolved if term.term_class.contrastive)
        self.needs_logit_bias = any(type(term).needs_logit_bias for term in self.terms.values())
        self.needs_feature_norms = any(term.needs_feature_norms for term in self.terms.values())

    def contrastive_only(self) -> Objective:
        """The objective of the contrastive term alone, weight 1 (what the meta step differentiates)."""
        return Objective(dataclasses.replace(self.config, terms={self.contrastive: {
            "weight": 1.0, **dataclasses.asdict(self.terms[self.contrastive].options)}}))

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: float | Tensor,
        *,
        logit_bias: float | Tensor | None = None,
        group_ids: Tensor | None = None,
        sample_weights: SampleWeights = None,
        weight_normalize: str = "mean",
        seed: int | None = None,
        step: int | None = None,
        image_norms: Tensor | None = None,
        text_norms: Tensor | None = None,
    ) -> ObjectiveOutput:
        """Evaluate every active term on the (gathered) batch and reduce with the sample weights.

        image_features, text_features: [n, D] unit-norm, this process's samples; logit_scale: the
        multiplier s; logit_bias: the SigLIP bias b (needed by ``siglip``); group_ids: [n] integers,
        samples of one group are positives of each other (``loss.positives: group``). sample_weights:
        the weights v_i of this process's samples, a tensor [n] or a callable mapping the detached
        local per-sample losses [n] to them (None: all 1); they may carry gradient. seed: of the
        random draws (None: fresh entropy, shared by all ranks). step: the training step, the same on
        every rank (for terms with a schedule; None outside training). image_norms, text_norms: [n]
        the features' norms before L2 normalisation (the model's outputs of those names; needed by
        terms that declare ``needs_feature_norms``). Under torch.distributed every rank must make the
        same calls: the objective gathers.
        """
        _check_weights(sample_weights, image_features, weight_normalize)
        evaluated = self.evaluate(image_features, text_features, logit_scale, logit_bias=logit_bias,
                                  group_ids=group_ids, seed=seed, step=step, image_norms=image_norms,
                                  text_norms=text_norms)
        weights = sample_weights
        if callable(sample_weights):
            weights = sample_weights(evaluated.weight_input)
            if not isinstance(weights, Tensor) or weights.shape != evaluated.per_sample.shape:
                shape = list(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__
                raise ValueError(f"sample_weights returned shape {shape}, expected [n] = "
                                 f"{list(evaluated.per_sample.shape)}")
        return self.reduce(evaluated, weights, weight_normalize)

    def evaluate(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: float | Tensor,
        *,
        logit_bias: float | Tensor | None = None,
        group_ids: Tensor | None = None,
        seed: int | None = None,
        step: int | None = None,
        image_norms: Tensor | None = None,
        text_norms: Tensor | None = None,
    ) -> ObjectiveTerms:
        """The per-sample contrastive losses (unreduced) and the other terms' values (arguments as :meth:`forward`)."""
        _check_inputs(image_features, text_features, logit_scale, seed)
        if step is not None and (not isinstance(step, (int, np.integer)) or step < 0):
            raise ValueError(f"step={step!r} must be an integer >= 0 or None")
        norms = None
        if self.needs_feature_norms:
            if image_norms is None or text_norms is None:
                raise ValueError(f"loss term {self.contrastive!r} with these options needs the features' norms "
                                 f"before L2 normalisation: pass image_norms and text_norms (the dual encoder's "
                                 f"outputs of those names)")
            for name, value in (("image_norms", image_norms), ("text_norms", text_norms)):
                if not isinstance(value, Tensor) or value.shape != image_features.shape[:1]:
                    shape = list(value.shape) if isinstance(value, Tensor) else type(value).__name__
                    raise ValueError(f"{name} must be a tensor of shape [n] = [{image_features.shape[0]}], got {shape}")
            norms = (image_norms, text_norms)
        if self.needs_logit_bias and logit_bias is None:
            raise ValueError(f"loss term {self.contrastive!r} needs logit_bias (the model's learnable SigLIP bias); "
                             f"set model.init_logit_bias")
        if group_ids is not None and (not isinstance(group_ids, Tensor) or group_ids.shape != image_features.shape[:1]
                                      or group_ids.is_floating_point()):
            shape = list(group_ids.shape) if isinstance(group_ids, Tensor) else type(group_ids).__name__
            raise ValueError(f"group_ids must be an integer tensor of shape [n] = [{image_features.shape[0]}], got {shape}")
        device = image_features.device
        # the pairwise math runs in fp32 or fp64 even inside an autocast region (see functional.py)
        with torch.autocast(device_type=device.type, enabled=False):
            rows, gathered_norms = self._gather(image_features, text_features, norms)
            rng = np.random.default_rng(distributed.shared_seed(seed, device))
            draws = {name: term.draw(rng, rows.total) for name, term in self.terms.items()}
            scale = _as_scale(logit_scale, rows.image)
            bias = None if logit_bias is None else torch.as_tensor(logit_bias, dtype=scale.dtype, device=device)
            if group_ids is not None and len(rows.sizes) > 1:
                group_ids = distributed.all_gather_no_grad(group_ids.to(device), rows.sizes)
            context = TermContext(rows, scale, image_features.dtype, draws, bias, group_ids, step=step,
                                  image_norms=gathered_norms[0], text_norms=gathered_norms[1])
            contrastive = self.terms[self.contrastive]
            per_sample_rows = contrastive.forward(context)
            regularizers = {name: term.forward(context) for name, term in self.terms.items()
                            if name != self.contrastive}
            weight_input_rows = None
            if type(contrastive).weight_input is not Term.weight_input:
                with torch.no_grad():
                    weight_input_rows = contrastive.weight_input(context, per_sample_rows)
        return ObjectiveTerms(rows, per_sample_rows, regularizers, weight_input_rows)

    def reduce(self, evaluated: ObjectiveTerms, sample_weights: Tensor | None = None,
               weight_normalize: str = "mean") -> ObjectiveOutput:
        """The loss from the unreduced terms and this process's sample weights [n] (or None)."""
        rows = evaluated.rows
        with torch.autocast(device_type=evaluated.per_sample_rows.device.type, enabled=False):
            values = {self.contrastive: reduce_weighted(evaluated.per_sample_rows, rows, sample_weights,
                                                        weight_normalize)}
            values.update(evaluated.regularizers)
            values = {name: values[name] for name in self.terms}  # registry order, as logged
            loss = sum(self.term_weights[name] * value for name, value in values.items())
            logged = torch.stack([value.detach() for value in values.values()] + [loss.detach()])
            if not rows.is_global:
                logged = distributed.all_reduce_values(logged, average=True)
                # every rank reports (and decides on, e.g. skipping a non-finite step) the global value
                loss = loss + (logged[-1] - loss).detach()
        terms = dict(zip([*values, "total"], logged.unbind()))
        weights = None if sample_weights is None else sample_weights.detach()
        return ObjectiveOutput(loss=loss, terms=terms, per_sample=evaluated.per_sample, weights=weights)

    # ----------------------------------------------------------------------------------------

    def _gather(self, image_features: Tensor, text_features: Tensor,
                norms: tuple[Tensor, Tensor] | None) -> tuple[Rows, tuple[Tensor | None, Tensor | None]]:
        """This rank's rows and the whole batch's columns; with ``norms``, the whole batch's norms [N] too.

        The norms travel through the same gather as the features (as a column beside them), so a
        term reading them gets the same gradients in every mode and process count.
        """
        rank, world_size = distributed.world_info()
        local_image, local_text = _upcast(image_features), _upcast(text_features)
        local_norms = None if norms is None else tuple(_upcast(value).to(local_image.dtype) for value in norms)
        if world_size == 1:
            rows = Rows(local_image, local_text, local_image, local_text, 0, [image_features.shape[0]], 0, True)
            return rows, local_norms or (None, None)
        sizes = distributed.gather_sizes(image_features.shape[0], image_features.device)
        width = local_image.shape[1]
        if local_norms is not None:
            # one gather per modality: the norm rides as an extra column of the features
            local_image_ext = torch.cat([local_image, local_norms[0][:, None]], dim=1)
            local_text_ext = torch.cat([local_text, local_norms[1][:, None]], dim=1)
        else:
            local_image_ext, local_text_ext = local_image, local_text
        if self.config.gather_with_grad:
            all_image = distributed.all_gather_with_grad(local_image_ext, sizes)
            all_text = distributed.all_gather_with_grad(local_text_ext, sizes)
        else:
            # Global mode only (checked in __init__): every rank holds the whole loss, so the local
            # rows' gradient is complete without backward traffic; the factor undoes the averaging
            # over ranks that DDP applies to parameter gradients.
            all_image = distributed.all_gather_local_grad(distributed.scale_gradient(local_image_ext, world_size),
                                                          sizes)
            all_text = distributed.all_gather_local_grad(distributed.scale_gradient(local_text_ext, world_size),
                                                         sizes)
        gathered_norms: tuple[Tensor | None, Tensor | None] = (None, None)
        if local_norms is not None:
            gathered_norms = (all_image[:, width], all_text[:, width])
            all_image, all_text = all_image[:, :width], all_text[:, :width]
        if self.config.local_loss:
            return Rows(local_image, local_text, all_image, all_text, sum(sizes[:rank]), sizes, rank, False), \
                gathered_norms
        return Rows(all_image, all_text, all_image, all_text, 0, sizes, rank, True), gathered_norms


# --------------------------------------------------------------------------------------------
# checks at the seam


def _check_weights(sample_weights: SampleWeights, image_features: Tensor, weight_normalize: str) -> None:
    if weight_normalize not in NORMALIZATIONS:
        raise ValueError(f"weight_normalize={weight_normalize!r} must be 'mean' or 'sum'")
    if sample_weights is None or callable(sample_weights):
        return
    if not isinstance(sample_weights, Tensor) or sample_weights.shape != (image_features.shape[0],):
        shape = list(sample_weights.shape) if isinstance(sample_weights, Tensor) else type(sample_weights).__name__
        raise ValueError(f"sample_weights must be a tensor of shape [n] = [{image_features.shape[0]}] or a "
                         f"callable, got {shape}")
    if not sample_weights.is_floating_point():
        raise ValueError(f"sample_weights must be a float tensor, got {sample_weights.dtype}")
    minimum = sample_weights.detach().float().amin().item()
    if minimum < 0:
        raise ValueError(f"sample_weights must be >= 0, got a minimum of {minimum:.3g}")


def _check_inputs(image_features: Tensor, text_features: Tensor, logit_scale: float | Tensor, seed: int | None) -> None:
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
    if seed is not None and not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed={seed!r} must be an integer or None")
    # one host sync for all value checks; NaN rows pass, so a diverged model yields a non-finite loss
    # that the training loop counts and skips instead of an exception
    with torch.no_grad():
        checks = [((torch.linalg.vector_norm(features.float(), dim=1) - 1).abs().amax())
                  for features in (image_features, text_features)]
        checks.append(torch.as_tensor(logit_scale, dtype=torch.float32, device=image_features.device).reshape(()))
        found = torch.stack(checks).tolist()
    for name, features, deviation in zip(("image_features", "text_features"), (image_features, text_features), found):
        # half-precision rows carry norm errors of a few 1e-3
        tolerance = 2e-2 if features.dtype in (torch.float16, torch.bfloat16) else 1e-3
        if deviation > tolerance:
            raise ValueError(f"{name} must hold L2-normalised rows: max |‖row‖ − 1| = {deviation:.3g} "
                             f"(tolerance {tolerance:g}); pass the encoder's normalised features")
    if found[2] <= 0:
        raise ValueError(f"logit_scale={found[2]:.3g} must be > 0 (it is the multiplier exp(log-scale))")
