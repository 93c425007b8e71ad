"""One meta iteration of Meta-Weight-Net (NeurIPS 2019, as used by MAMA, ECCV 2024).

1. virtual step ``ŵ(Θ) = w − α·∇_w (1/n) Σ V(ℓ_i.detach(); Θ)·ℓ_i(w)`` with the graph kept;
2. meta update ``Θ ← Θ − β·∇_Θ L_meta(ŵ(Θ))`` with ``L_meta`` the unweighted contrastive loss on
   a clean meta batch.

A first-order shortcut would give a zero meta-gradient (Θ enters only through the weights), so the
virtual step is always second order.
"""

from __future__ import annotations

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
    """What one meta iteration measured, for logging."""

    virtual_loss: float
    meta_loss: float
    weight_mean: float


def _average_across_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """Differentiable mean over ranks: the virtual step must use the data-parallel gradient."""
    world_size = world_info().world_size
    return tensor if world_size == 1 else all_reduce_with_grad(tensor) / world_size


def meta_step(
    model: nn.Module,
    contrastive: ContrastiveFn,
    weight_net: WeightNet,
    weight_optimizer: torch.optim.Optimizer,
    train_inputs: dict[str, torch.Tensor],
    meta_inputs: dict[str, torch.Tensor],
    *,
    parameter_names: list[str],
    virtual_lr: float,
) -> MetaStepResult:
    """Update ``weight_net`` by one second-order meta step; the model's own parameters are untouched.

    ``model`` is the unwrapped dual encoder (its ``forward`` returns ``image_features``,
    ``text_features`` and ``logit_scale``); ``contrastive(image_features, text_features,
    logit_scale, sample_weights)`` returns ``(loss, per_sample)`` where ``sample_weights`` maps the
    detached per-sample losses to weights (or is None for the unweighted meta loss).
    """
    if not parameter_names:
        raise ValueError("meta_step needs at least one parameter to take the virtual step")
    parameters = dict(model.named_parameters())
    missing = [name for name in parameter_names if name not in parameters]
    if missing:
        raise ValueError(f"meta_step: unknown parameter names {missing[:3]}")
    virtual = {name: parameters[name] for name in parameter_names}
    # fused attention kernels have no double backward; the math kernel does
    with sdpa_kernel(SDPBackend.MATH):
        return _meta_step(model, contrastive, weight_net, weight_optimizer, train_inputs, meta_inputs, virtual,
                          virtual_lr)


def _meta_step(model, contrastive, weight_net, weight_optimizer, train_inputs, meta_inputs, virtual, virtual_lr):
    # 1. virtual step, graph kept so that ŵ is a function of Θ
    outputs = functional_call(model, virtual, args=(), kwargs=train_inputs)
    weights_seen: list[torch.Tensor] = []

    def weigh(per_sample: torch.Tensor) -> torch.Tensor:
        weights = weight_net(per_sample.detach())
        weights_seen.append(weights.detach())
        return weights

    virtual_loss, _ = contrastive(outputs["image_features"], outputs["text_features"],
                                  outputs["logit_scale"], weigh)
    gradients = torch.autograd.grad(virtual_loss, list(virtual.values()), create_graph=True,
                                    allow_unused=True)
    stepped = {}
    for (name, parameter), gradient in zip(virtual.items(), gradients):
        if gradient is None:  # e.g. the temporal head on an image batch
            stepped[name] = parameter
            continue
        stepped[name] = parameter - virtual_lr * _average_across_ranks(gradient)

    # 2. meta update on the clean meta batch, unweighted
    meta_outputs = functional_call(model, stepped, args=(), kwargs=meta_inputs)
    meta_loss, _ = contrastive(meta_outputs["image_features"], meta_outputs["text_features"],
                               meta_outputs["logit_scale"], None)
    weight_parameters = list(weight_net.parameters())
    meta_gradients = torch.autograd.grad(meta_loss, weight_parameters, allow_unused=True)
    for parameter, gradient in zip(weight_parameters, meta_gradients):
        gradient = torch.zeros_like(parameter) if gradient is None else gradient.detach()
        # each rank holds Σ_r' ∂L_meta,r'/∂Θ_r; their mean is the single-process meta-gradient, and
        # averaging keeps the WeightNet identical on every rank
        parameter.grad = all_reduce_values(gradient, average=True)
    weight_optimizer.step()
    weight_optimizer.zero_grad(set_to_none=True)
    weight_mean = torch.cat(weights_seen).mean().item() if weights_seen else float("nan")
    return MetaStepResult(virtual_loss=virtual_loss.item(), meta_loss=meta_loss.item(),
                          weight_mean=weight_mean)
