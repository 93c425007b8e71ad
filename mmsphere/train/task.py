"""The training task: what one step needs to turn a :class:`~mmsphere.data.Batch` into a loss and gradients.

A :class:`Task` owns the dual encoder (prepared by accelerate for the forwards and the backward,
unwrapped for its parameters, clamps and the meta iteration), the objective, the optional meta
weighting, and the step's settings (accumulation, clipping, the weights' normalisation, the
scheduler). ``task(batch)`` is the weighted objective of a batch; :meth:`Task.forward_backward`
adds the backward (with accumulation against the whole batch's features); :meth:`Task.meta_step`
is one meta iteration of the WeightNet. See ARCHITECTURE.md for the data path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch
import torch.distributed as dist
from accelerate import Accelerator

from mmsphere.models.config import MAX_LOG_LOGIT_SCALE
from mmsphere.train.config import Config
from mmsphere.data.batch import Batch
from mmsphere.losses import Objective, ObjectiveOutput
from mmsphere.weighting import MetaStepResult, MetaWeighting, SharedForward, capture_before_forward
from mmsphere.losses.objective import ObjectiveTerms

# a bias beyond the largest logit magnitude (s ≤ 100) would give every pair the same sign
MAX_ABS_LOGIT_BIAS = 100.0


class Task:
    """The dual encoder, its objective and the optional meta weighting: ``task(batch)`` is the batch's weighted loss.

    ``network``: the unwrapped dual encoder; ``model``: what ``accelerator.prepare`` made of it (the
    network itself when unprepared). ``scheduler``: stepped after each optimiser step (None: none).
    ``normalize``: how the weights reduce the per-sample losses (``meta.normalize``); ``virtual_lr``:
    the meta iteration's rate (None: each parameter's optimiser group's current rate).
    """

    def __init__(self, network: torch.nn.Module, objective: Objective, accelerator: Accelerator, *,
                 model: torch.nn.Module | None = None, weighting: MetaWeighting | None = None, scheduler=None,
                 accum_freq: int = 1, grad_clip: float | None = None, normalize: str = "mean",
                 virtual_lr: float | None = None, seed: int = 0) -> None:
        self.network = network
        self.model = model if model is not None else network
        self.objective = objective
        self.accelerator = accelerator
        self.weighting = weighting
        self.scheduler = scheduler
        self.accum_freq = accum_freq
        self.grad_clip = grad_clip
        self.normalize = normalize
        self.virtual_lr = virtual_lr
        self.seed = seed  # the run's seed: with the step, it fixes the objective's random draws

    @classmethod
    def from_config(cls, config: Config, network: torch.nn.Module, accelerator: Accelerator, *,
                    model: torch.nn.Module | None = None, objective: Objective | None = None,
                    weighting: MetaWeighting | None = None, scheduler=None) -> Task:
        """The task ``config`` describes: its objective (``loss``) and step settings (``train``, ``meta``)."""
        return cls(network, objective if objective is not None else Objective(config.loss), accelerator,
                   model=model, weighting=weighting, scheduler=scheduler, accum_freq=config.train.accum_freq,
                   grad_clip=config.train.grad_clip, normalize=config.meta.normalize,
                   virtual_lr=config.meta.virtual_lr, seed=config.seed)

    @property
    def device(self) -> torch.device:
        """Where the batches go: the accelerator's device."""
        return self.accelerator.device

    def draw_seed(self, step: int) -> int:
        """The seed of the objective's random draws at ``step``: the same on every rank and micro-batch."""
        return self.seed * 1_000_003 + step

    def __call__(self, batch: Batch, *, step: int = 0) -> ObjectiveOutput:
        """The batch's objective at training step ``step``: features -> terms -> per-sample weights -> reduced loss.

        Forward only, under autocast; ``step`` fixes the random draws and any term's schedule.
        """
        with self.accelerator.autocast():
            return self.weighted_loss(self.model(**batch.encoder_inputs()), batch.group_ids, step)

    def weighted_loss(self, features: Mapping[str, torch.Tensor], group_ids: torch.Tensor | None,
                      step: int) -> ObjectiveOutput:
        """The objective's per-sample losses on ``features``, weighted by the WeightNet (if any) and reduced."""
        evaluated = self.objective.evaluate(**features, group_ids=group_ids, seed=self.draw_seed(step), step=step)
        weights = self.weighting.weights(evaluated.weight_input) if self.weighting is not None else None
        return self.objective.reduce(evaluated, weights, self.normalize)

    def forward_backward(self, batch: Batch, *, step: int = 0) -> ObjectiveOutput:
        """Forward and backward of this process's share of the global batch (no backward when the loss is not finite).

        With ``accum_freq > 1`` the features of every micro-batch are first computed without grad and
        cached; each micro-batch is then re-encoded with grad and its slice replaces the cached one
        (open_clip's ``--accum-freq``), so the loss always sees the whole batch. The logit scale (and
        bias) carry grad in the first micro-batch only, so their gradient is counted once.
        """
        accelerator = self.accelerator
        if self.accum_freq == 1:
            result = self(batch, step=step)
            if finite_everywhere(result.loss):
                accelerator.backward(result.loss)
            return result

        micro_inputs = _split(batch.encoder_inputs(), self.accum_freq)
        with torch.no_grad(), accelerator.autocast():
            cached = [self.model(**micro) for micro in micro_inputs]
        result = None
        for index, micro in enumerate(micro_inputs):
            sync = contextlib.nullcontext() if index == self.accum_freq - 1 else accelerator.no_sync(self.model)
            with sync:
                with accelerator.autocast():
                    outputs = self.model(**micro)
                    features = {name: torch.cat([out[name] for out in cached[:index]] + [outputs[name]]
                                                + [out[name] for out in cached[index + 1:]])
                                for name in ("image_features", "text_features", "image_norms", "text_norms")
                                if name in outputs}
                    for name in ("logit_scale", "logit_bias"):
                        if name in outputs:
                            features[name] = outputs[name] if index == 0 else outputs[name].detach()
                    micro_result = self.weighted_loss(features, batch.group_ids, step)
                if not finite_everywhere(micro_result.loss):
                    return micro_result
                accelerator.backward(micro_result.loss)
            result = result or micro_result
        return result

    def reuses_train_forward(self) -> bool:
        """Whether a meta iteration shares the real step's train forward (:meth:`meta_and_forward_backward`).

        It does with the ``jvp`` meta-gradient, no accumulation and no autocast: then the real
        forward is the fp32 forward the meta iteration would run itself. Otherwise the meta
        iteration runs its own forward first (the reference path).
        """
        return (self.weighting is not None and self.weighting.config.meta.gradient == "jvp" and self.accum_freq == 1
                and self.accelerator.mixed_precision == "no" and self.weighting.config.meta.reuse_forward)

    def meta_and_forward_backward(self, batch: Batch, meta_batch: Batch, optimizer: torch.optim.Optimizer, *,
                                  step: int = 0) -> tuple[MetaStepResult, ObjectiveOutput]:
        """A meta iteration and the real forward + backward on one shared train forward.

        The forward at w gives the per-sample losses once; the virtual gradient is a backward of
        the loss weighted by the current WeightNet, the WeightNet takes its meta step, and the real
        backward runs on the same graph with the updated weights. Same updates as :meth:`meta_step`
        followed by :meth:`forward_backward` (the MW-Net order), one train forward fewer.
        """
        weighting = self.weighting
        buffers, random_state = capture_before_forward(self.network)
        with self.accelerator.autocast():
            features = self.model(**batch.encoder_inputs())
        evaluated = self.objective.evaluate(**features, group_ids=batch.group_ids, seed=self.draw_seed(step),
                                            step=step)
        weight_input = evaluated.weight_input
        old_weights = weighting.virtual_weights(weight_input)
        # the virtual loss: the contrastive term alone, weighted, as the meta step defines it
        contrastive = ObjectiveTerms(evaluated.rows, evaluated.per_sample_rows, {}, evaluated.weight_input_rows)
        virtual_loss = weighting.objective.reduce(contrastive, old_weights, self.normalize).loss
        rates = self.virtual_lr or weighting.group_rates(optimizer)
        shared = SharedForward(virtual_loss, old_weights, buffers, random_state)
        meta = weighting.meta_step_reusing(shared, batch.encoder_inputs(), meta_batch.encoder_inputs(),
                                           virtual_lr=rates, train_group_ids=batch.group_ids,
                                           meta_group_ids=meta_batch.group_ids, step=step)
        result = self.objective.reduce(evaluated, weighting.weights(weight_input), self.normalize)
        if finite_everywhere(result.loss):
            self.accelerator.backward(result.loss)
        return meta, result

    def meta_step(self, batch: Batch, meta_batch: Batch, optimizer: torch.optim.Optimizer | None = None, *,
                  step: int = 0) -> MetaStepResult | None:
        """One meta iteration of the WeightNet on ``batch`` (virtual step) and ``meta_batch`` (meta loss); None without one.

        The virtual step takes ``virtual_lr`` when set, else each parameter's current rate in ``optimizer``.
        """
        if self.weighting is None:
            return None
        if self.virtual_lr is None and optimizer is None:
            raise ValueError("meta_step: without meta.virtual_lr the optimizer's group rates are needed")
        rates = self.virtual_lr or self.weighting.group_rates(optimizer)
        return self.weighting.meta_step(batch.encoder_inputs(), meta_batch.encoder_inputs(), virtual_lr=rates,
                                        train_group_ids=batch.group_ids, meta_group_ids=meta_batch.group_ids,
                                        step=step)

    def clip_gradients(self) -> None:
        """Clip the gradients to ``grad_clip`` in global norm (if set)."""
        if self.grad_clip is not None:
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.grad_clip)

    def clamp_logit_scale(self) -> None:
        """Keep ``log s`` in [0, ln 100] and the logit bias (SigLIP) within the largest logit magnitude."""
        with torch.no_grad():
            self.network.log_logit_scale.clamp_(0.0, MAX_LOG_LOGIT_SCALE)
            bias = getattr(self.network.clip, "logit_bias", None)
            if bias is not None:
                bias.clamp_(-MAX_ABS_LOGIT_BIAS, MAX_ABS_LOGIT_BIAS)


def finite_everywhere(loss: torch.Tensor) -> bool:
    """True when the loss is finite on every process (all must skip a step together)."""
    flag = torch.isfinite(loss.detach()).all().to(torch.float32).reshape(1)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0)


def _split(inputs: dict[str, torch.Tensor], parts: int) -> list[dict[str, torch.Tensor]]:
    chunks = {name: tensor.chunk(parts) for name, tensor in inputs.items()}
    return [{name: chunks[name][index] for name in inputs} for index in range(parts)]
