"""One optimisation step: features → objective terms → per-sample weights → reduced loss → update.

:func:`optimization_step` is the step the training loop, the distributed tests and the benchmarks
all run: an optional meta iteration of the WeightNet, the forward and backward of the global batch
(with accumulation against the whole batch's features), a collective check that the loss is finite
everywhere (a non-finite step is skipped and its BatchNorm statistics restored), gradient
clipping, the optimiser and scheduler steps, and the clamps of the logit scale and bias.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from accelerate import Accelerator

from mmsphere.config import MAX_LOG_LOGIT_SCALE, Config
from mmsphere.losses import Objective, ObjectiveOutput
from mmsphere.weighting import MetaStepResult, MetaWeighting

# a bias beyond the largest logit magnitude (s ≤ 100) would give every pair the same sign
MAX_ABS_LOGIT_BIAS = 100.0


@dataclass
class StepResult:
    """What one optimisation step did: the objective's output, the meta iteration's, and whether it was skipped."""

    output: ObjectiveOutput
    meta: MetaStepResult | None
    skipped: bool  # non-finite loss somewhere: no update, BatchNorm statistics restored


def optimization_step(
    model: torch.nn.Module,
    network: torch.nn.Module,
    objective: Objective,
    optimizer: torch.optim.Optimizer,
    scheduler,
    accelerator: Accelerator,
    config: Config,
    inputs: dict[str, torch.Tensor],
    *,
    seed: int,
    weighting: MetaWeighting | None = None,
    meta_inputs: dict[str, torch.Tensor] | None = None,
    group_ids: torch.Tensor | None = None,
    meta_group_ids: torch.Tensor | None = None,
) -> StepResult:
    """One step on this process's share of the global batch (``model`` prepared, ``network`` unwrapped).

    With ``weighting`` and ``meta_inputs``, a meta iteration of the WeightNet runs first (each
    parameter's virtual step at its optimiser group's current rate unless ``meta.virtual_lr``).
    """
    meta = None
    if weighting is not None and meta_inputs is not None:
        meta = weighting.meta_step(inputs, meta_inputs,
                                   virtual_lr=config.meta.virtual_lr or weighting.group_rates(optimizer),
                                   train_group_ids=group_ids, meta_group_ids=meta_group_ids)
    statistics = running_statistics(network)
    saved = {name: buffer.clone() for name, buffer in statistics.items()}
    output = train_step(model, objective, inputs, accelerator, config, weighting=weighting, group_ids=group_ids,
                        seed=seed)
    if not _finite_everywhere(output.loss):
        optimizer.zero_grad(set_to_none=True)
        # the skipped forward already folded its (non-finite) batch statistics into BatchNorm
        with torch.no_grad():
            for name, buffer in statistics.items():
                buffer.copy_(saved[name])
        return StepResult(output, meta, skipped=True)
    if config.train.grad_clip is not None:
        accelerator.clip_grad_norm_(model.parameters(), config.train.grad_clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        network.log_logit_scale.clamp_(0.0, MAX_LOG_LOGIT_SCALE)
        bias = getattr(network.clip, "logit_bias", None)
        if bias is not None:
            bias.clamp_(-MAX_ABS_LOGIT_BIAS, MAX_ABS_LOGIT_BIAS)
    return StepResult(output, meta, skipped=False)


def train_step(model, objective, inputs: dict[str, torch.Tensor], accelerator: Accelerator, config: Config,
               *, weighting: MetaWeighting | None = None, group_ids: torch.Tensor | None = None, seed: int):
    """Forward and backward of one global batch: features → objective terms → weights → reduced loss.

    With ``accum_freq > 1`` the features of every micro-batch are first computed without grad and
    cached; each micro-batch is then re-encoded with grad and its slice replaces the cached one
    (open_clip's ``--accum-freq``), so the loss always sees the whole batch. The logit scale (and
    bias) carry grad in the first micro-batch only, so their gradient is counted once.
    """
    accum = config.train.accum_freq
    if accum == 1:
        with accelerator.autocast():
            result = weighted_loss(objective, model(**inputs), weighting, group_ids, config, seed)
        if _finite_everywhere(result.loss):
            accelerator.backward(result.loss)
        return result

    micro_inputs = _split(inputs, accum)
    with torch.no_grad(), accelerator.autocast():
        cached = [model(**micro) for micro in micro_inputs]
    result = None
    for index, micro in enumerate(micro_inputs):
        sync = contextlib.nullcontext() if index == accum - 1 else accelerator.no_sync(model)
        with sync:
            with accelerator.autocast():
                outputs = model(**micro)
                features = {name: torch.cat([out[name] for out in cached[:index]] + [outputs[name]]
                                            + [out[name] for out in cached[index + 1:]])
                            for name in ("image_features", "text_features")}
                for name in ("logit_scale", "logit_bias"):
                    if name in outputs:
                        features[name] = outputs[name] if index == 0 else outputs[name].detach()
                micro_result = weighted_loss(objective, features, weighting, group_ids, config, seed)
            if not _finite_everywhere(micro_result.loss):
                return micro_result
            accelerator.backward(micro_result.loss)
        result = result or micro_result
    return result


def weighted_loss(objective, features: dict[str, torch.Tensor], weighting: MetaWeighting | None,
                  group_ids: torch.Tensor | None, config: Config, seed: int):
    """The objective's per-sample losses, weighted by the WeightNet (if any) and reduced."""
    evaluated = objective.evaluate(**features, group_ids=group_ids, seed=seed)
    weights = weighting.weights(evaluated.per_sample) if weighting is not None else None
    return objective.reduce(evaluated, weights, config.meta.normalize)


def _split(inputs: dict[str, torch.Tensor], parts: int) -> list[dict[str, torch.Tensor]]:
    chunks = {name: tensor.chunk(parts) for name, tensor in inputs.items()}
    return [{name: chunks[name][index] for name in inputs} for index in range(parts)]


def _finite_everywhere(loss: torch.Tensor) -> bool:
    """True when the loss is finite on every process (all must skip a step together)."""
    flag = torch.isfinite(loss.detach()).all().to(torch.float32).reshape(1)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0)


def running_statistics(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The BatchNorm buffers a forward in train mode updates (running mean/var, batches tracked)."""
    return {f"{module_name}.{name}" if module_name else name: buffer
            for module_name, module in network.named_modules()
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm)
            for name, buffer in module.named_buffers(recurse=False) if buffer is not None}
