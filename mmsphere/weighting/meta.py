"""One meta iteration of Meta-Weight-Net (NeurIPS 2019, as used by MAMA, ECCV 2024).

1. virtual step ``ŵ(Θ) = w − α·∇_w (1/n) Σ V(ℓ_i.detach(); Θ)·ℓ_i(w)`` with the graph kept;
2. meta update ``Θ ← Θ − β·∇_Θ L_meta(ŵ(Θ))`` with ``L_meta`` the unweighted contrastive loss on
   a clean meta batch.

A first-order shortcut would give a zero meta-gradient (Θ enters only through the weights), so the
virtual step is always second order.

What the real model keeps (DESIGN §1): both forwards run on a copy of the model's buffers, so
BatchNorm running statistics and ``num_batches_tracked`` are untouched (Meta-Weight-Net's own code
runs them on a separate copy of the model); they run in fp32 outside any autocast region, also
when accelerate has wrapped the model's ``forward`` in autocast; they draw from a forked RNG, so
the real step's dropout masks do not depend on whether a meta iteration ran; and a non-finite value
anywhere skips the iteration without touching the WeightNet or its optimiser.

Collectives: every rank makes the same calls in the same order whatever its batch held: one
all-reduce of all virtual gradients (zeros for parameters that received none, e.g. the temporal
head on an image batch), the objective's gathers, and one all-reduce of the meta-gradient together
with a non-finite flag. No collective is ever conditional on rank-local data.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from mmsphere.losses.distributed import all_reduce_values, all_reduce_with_grad, world_info
from mmsphere.weighting.weight_net import WeightNet

# (image_features, text_features, logit_scale, sample_weights) -> (loss, per_sample)
ContrastiveFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


@dataclass
class MetaStepResult:
    """What one meta iteration measured, for logging; ``skipped`` when a value was not finite."""

    virtual_loss: float
    meta_loss: float
    weight_mean: float
    skipped: bool = False


def meta_step(
    model: nn.Module,
    contrastive: ContrastiveFn,
    weight_net: WeightNet,
    weight_optimizer: torch.optim.Optimizer,
    train_inputs: dict[str, torch.Tensor],
    meta_inputs: dict[str, torch.Tensor],
    *,
    parameter_names: list[str],
    virtual_lr: float | Mapping[str, float],
) -> MetaStepResult:
    """Update ``weight_net`` by one second-order meta step; the model's parameters and buffers are untouched.

    ``model`` is the unwrapped dual encoder (its ``forward`` returns ``image_features``,
    ``text_features`` and ``logit_scale``); ``contrastive(image_features, text_features,
    logit_scale, sample_weights)`` returns ``(loss, per_sample)`` where ``sample_weights`` maps the
    detached per-sample losses to weights (or is None for the unweighted meta loss).
    ``virtual_lr``: one rate for every parameter, or one per parameter name (each parameter's own
    optimiser group's current rate).
    """
    if not parameter_names:
        raise ValueError("meta_step needs at least one parameter to take the virtual step")
    parameters = dict(model.named_parameters())
    missing = [name for name in parameter_names if name not in parameters]
    if missing:
        raise ValueError(f"meta_step: unknown parameter names {missing[:3]}")
    if isinstance(virtual_lr, Mapping):
        without = [name for name in parameter_names if name not in virtual_lr]
        if without:
            raise ValueError(f"meta_step: no virtual learning rate for {without[:3]}")
        rates = {name: float(virtual_lr[name]) for name in parameter_names}
    else:
        rates = dict.fromkeys(parameter_names, float(virtual_lr))
    virtual = {name: parameters[name] for name in parameter_names}
    device = next(iter(virtual.values())).device
    # fused attention kernels have no double backward; the math kernel does
    with _plain_forward(model), torch.autocast(device_type=device.type, enabled=False), \
            sdpa_kernel(SDPBackend.MATH), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        return _meta_step(model, contrastive, weight_net, weight_optimizer, train_inputs, meta_inputs, virtual, rates)


def _meta_step(model, contrastive, weight_net, weight_optimizer, train_inputs, meta_inputs, virtual, rates):
    # the forwards update these copies, never the real BatchNorm statistics
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}

    # 1. virtual step, graph kept so that ŵ is a function of Θ
    outputs = functional_call(model, (virtual, buffers), args=(), kwargs=train_inputs)
    weights_seen: list[torch.Tensor] = []

    def weigh(per_sample: torch.Tensor) -> torch.Tensor:
        weights = weight_net(per_sample.detach())
        weights_seen.append(weights.detach())
        return weights

    virtual_loss, _ = contrastive(outputs["image_features"], outputs["text_features"],
                                  outputs["logit_scale"], weigh)
    gradients = torch.autograd.grad(virtual_loss, list(virtual.values()), create_graph=True,
                                    allow_unused=True)
    # a parameter without a gradient on this rank (the temporal head on an image batch) still joins
    # the all-reduce: another rank may hold one, and a skipped collective hangs the others
    gradients = [torch.zeros_like(parameter) if gradient is None else gradient
                 for parameter, gradient in zip(virtual.values(), gradients)]
    averaged = _average_across_ranks(gradients)
    stepped = {name: parameter - rates[name] * gradient
               for (name, parameter), gradient in zip(virtual.items(), averaged)}

    # 2. meta update on the clean meta batch, unweighted
    meta_outputs = functional_call(model, (stepped, buffers), args=(), kwargs=meta_inputs)
    meta_loss, _ = contrastive(meta_outputs["image_features"], meta_outputs["text_features"],
                               meta_outputs["logit_scale"], None)
    weight_parameters = list(weight_net.parameters())
    meta_gradients = torch.autograd.grad(meta_loss, weight_parameters, allow_unused=True)
    meta_gradients = [torch.zeros_like(parameter) if gradient is None else gradient.detach()
                      for parameter, gradient in zip(weight_parameters, meta_gradients)]
    local_nonfinite = not (torch.isfinite(virtual_loss.detach()) & torch.isfinite(meta_loss.detach())).item()
    flat = torch.cat([gradient.reshape(-1) for gradient in meta_gradients]
                     + [meta_gradients[0].new_full((1,), float(local_nonfinite))])
    # each rank holds Σ_r' ∂L_meta,r'/∂Θ_r; their mean is the single-process meta-gradient, and
    # averaging keeps the WeightNet identical on every rank; the flag rides along in the same call
    flat = all_reduce_values(flat, average=True)
    weight_mean = torch.cat(weights_seen).mean().item() if weights_seen else float("nan")
    result = MetaStepResult(virtual_loss=virtual_loss.item(), meta_loss=meta_loss.item(), weight_mean=weight_mean)
    if flat[-1].item() > 0 or not torch.isfinite(flat[:-1]).all().item():
        weight_optimizer.zero_grad(set_to_none=True)
        result.skipped = True
        return result
    offset = 0
    for parameter in weight_parameters:
        parameter.grad = flat[offset:offset + parameter.numel()].view_as(parameter).to(parameter.dtype)
        offset += parameter.numel()
    weight_optimizer.step()
    weight_optimizer.zero_grad(set_to_none=True)
    return result


def _average_across_ranks(gradients: list[torch.Tensor]) -> list[torch.Tensor]:
    """Differentiable mean over ranks in one all-reduce: the virtual step uses the data-parallel gradient."""
    world_size = world_info().world_size
    if world_size == 1:
        return gradients
    flat = all_reduce_with_grad(torch.cat([gradient.reshape(-1) for gradient in gradients])) / world_size
    return [part.view_as(gradient) for part, gradient in zip(flat.split([g.numel() for g in gradients]), gradients)]


@contextlib.contextmanager
def _plain_forward(model: nn.Module) -> Iterator[None]:
    """Call the model's own ``forward`` inside the block, not accelerate's autocast wrapper of it.

    ``accelerator.prepare`` replaces ``model.forward`` by an instance attribute that enters
    autocast (and ``unwrap_model`` keeps it by default); ``functional_call`` would go through it
    and run the second-order step in bf16/fp16 without loss scaling.
    """
    wrapped = model.__dict__.pop("forward", None)
    try:
        yield
    finally:
        if wrapped is not None:
            model.forward = wrapped
