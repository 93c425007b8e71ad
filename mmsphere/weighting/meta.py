"""One meta iteration of Meta-Weight-Net (NeurIPS 2019, as used by MAMA, ECCV 2024).

1. virtual step ``ŵ(Θ) = w − α·∇_w (1/n) Σ V(ℓ_i.detach(); Θ)·ℓ_i(w)``;
2. meta update ``Θ ← Θ − β·∇_Θ L_meta(ŵ(Θ))`` with ``L_meta`` the unweighted contrastive loss on
   a clean meta batch.

A first-order shortcut would give a zero meta-gradient (Θ enters only through the weights). The
exact meta-gradient is computed in one of two ways: ``second_order`` differentiates through the
virtual step (the graph of its gradient kept: memory of a double backward through the model), and
``jvp`` (the default) from an ordinary backward at w, one at ŵ and one forward-mode pass at w
(see :func:`_jvp_meta_gradient`). Both give the same update (tested in float64).

What the real model keeps (ARCHITECTURE.md, Meta weighting): both forwards run on a copy of the model's buffers, so
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
import functools
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
from torch import nn
from torch.autograd import forward_ad
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from mmsphere.losses.distributed import all_reduce_values, all_reduce_with_grad, world_info
from mmsphere.weighting.weight_net import WeightNet

META_GRADIENTS = ("jvp", "second_order")


class ContrastiveObjective(Protocol):
    """What the meta step needs of an objective (:class:`mmsphere.losses.Objective` is one)."""

    def evaluate(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                 **extras: Any) -> Any:
        """Unreduced terms with ``.per_sample`` [n], the local per-sample losses (and optionally ``.weight_input`` [n])."""

    def reduce(self, evaluated: Any, sample_weights: torch.Tensor | None, weight_normalize: str) -> Any:
        """The reduced output with ``.loss``."""


@dataclass
class MetaStepResult:
    """What one meta iteration measured, for logging; ``skipped`` when a value was not finite."""

    virtual_loss: float
    meta_loss: float
    weight_mean: float
    skipped: bool = False


def meta_step(
    model: nn.Module,
    objective: ContrastiveObjective,
    weight_net: WeightNet,
    weight_optimizer: torch.optim.Optimizer,
    train_inputs: dict[str, torch.Tensor],
    meta_inputs: dict[str, torch.Tensor],
    *,
    parameter_names: list[str],
    virtual_lr: float | Mapping[str, float],
    gradient: str = "jvp",
    normalize: str = "mean",
    train_group_ids: torch.Tensor | None = None,
    meta_group_ids: torch.Tensor | None = None,
    step: int | None = None,
) -> MetaStepResult:
    """Update ``weight_net`` by one second-order meta step; the model's parameters and buffers are untouched.

    ``model`` is the unwrapped dual encoder (its ``forward`` returns ``image_features``,
    ``text_features``, ``logit_scale`` and, with SigLIP, ``logit_bias``); ``objective`` is the
    contrastive objective (its per-sample losses are what the WeightNet weighs, reduced with
    ``normalize``; the meta loss is its unweighted value on the meta batch).
    ``virtual_lr``: one rate for every parameter, or one per parameter name (each parameter's own
    optimiser group's current rate). ``gradient``: ``"jvp"`` (exact, first-order passes and one
    forward-mode pass) or ``"second_order"`` (differentiating through the virtual step, the reference).
    ``step``: the training step, passed to the objective (terms with a schedule see the real step's value).
    """
    if gradient not in META_GRADIENTS:
        raise ValueError(f"meta_step: gradient={gradient!r} must be one of {', '.join(META_GRADIENTS)}")
    virtual, rates = _virtual_parameters(model, parameter_names, virtual_lr)
    with _meta_context(model, virtual):
        losses = _Losses(objective, normalize, train_group_ids, meta_group_ids, step)
        return _meta_step(model, losses, weight_net, weight_optimizer, train_inputs, meta_inputs, virtual, rates,
                          gradient)


@dataclass
class SharedForward:
    """What the real step's forward leaves for a meta iteration that reuses it (:func:`meta_step_reusing`).

    ``virtual_loss``: the weighted contrastive loss at w with the current weights, detached from Θ,
    its graph through the model kept; ``weights``: those weights [n]; ``buffers``: copies of the
    model's buffers taken before that forward; ``random_state``: the global RNG state before it, so
    the forward-mode pass replays the same dropout masks.
    """

    virtual_loss: torch.Tensor
    weights: torch.Tensor
    buffers: dict[str, torch.Tensor]
    random_state: _RandomState


def capture_before_forward(model: nn.Module) -> tuple[dict[str, torch.Tensor], _RandomState]:
    """Copies of the model's buffers and the RNG state, taken just before the forward a meta step will reuse."""
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    return buffers, _RandomState(next(model.parameters()).device)


def meta_step_reusing(
    model: nn.Module,
    objective: ContrastiveObjective,
    weight_net: WeightNet,
    weight_optimizer: torch.optim.Optimizer,
    shared: SharedForward,
    train_inputs: dict[str, torch.Tensor],
    meta_inputs: dict[str, torch.Tensor],
    *,
    parameter_names: list[str],
    virtual_lr: float | Mapping[str, float],
    normalize: str = "mean",
    train_group_ids: torch.Tensor | None = None,
    meta_group_ids: torch.Tensor | None = None,
    step: int | None = None,
) -> MetaStepResult:
    """The ``jvp`` meta iteration with its virtual gradient taken from the real step's own forward.

    The real step's forward at w (its graph kept for the real backward) is the virtual step's
    forward: the virtual gradient is a backward of ``shared.virtual_loss`` on that graph (kept for
    the real backward with the updated weights), so the iteration runs one forward fewer than
    :func:`meta_step`: the passes it cannot avoid are the train forward, two train backwards, the
    meta forward + backward at ŵ and one forward-mode pass at w. Same update as :func:`meta_step`
    with ``gradient="jvp"`` whenever the two forwards agree (fp32, the same dropout draws).
    """
    virtual, rates = _virtual_parameters(model, parameter_names, virtual_lr)
    with _meta_context(model, virtual):
        losses = _Losses(objective, normalize, train_group_ids, meta_group_ids, step)
        gradients = torch.autograd.grad(shared.virtual_loss, list(virtual.values()), retain_graph=True,
                                        allow_unused=True)
        weight_parameters = list(weight_net.parameters())
        meta_gradients, meta_loss = _jvp_from_virtual_gradients(
            model, losses, weight_net, weight_parameters, gradients, train_inputs, meta_inputs, virtual, rates,
            shared.buffers, shared.random_state)
        return _apply_meta_gradient(weight_parameters, weight_optimizer, meta_gradients,
                                    shared.virtual_loss.detach(), meta_loss, shared.weights)


def _virtual_parameters(model: nn.Module, parameter_names: list[str],
                        virtual_lr: float | Mapping[str, float]) -> tuple[dict[str, nn.Parameter], dict[str, float]]:
    """The parameters the virtual step moves, and each one's rate; names and rates checked."""
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
    return {name: parameters[name] for name in parameter_names}, rates


@contextlib.contextmanager
def _meta_context(model: nn.Module, virtual: dict[str, nn.Parameter]) -> Iterator[None]:
    """The model's own forward, fp32 outside autocast, the math attention kernel, a forked RNG."""
    device = next(iter(virtual.values())).device
    # fused attention kernels have no double backward; the math kernel does
    with _plain_forward(model), torch.autocast(device_type=device.type, enabled=False), \
            sdpa_kernel(SDPBackend.MATH), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        yield


class _Losses:
    """The virtual (weighted) and meta (unweighted) losses of the objective on model outputs."""

    def __init__(self, objective: ContrastiveObjective, normalize: str, train_group_ids, meta_group_ids,
                 step: int | None = None) -> None:
        self.objective = objective
        self.step = step
        self.normalize = normalize
        self.train_group_ids = train_group_ids
        self.meta_group_ids = meta_group_ids

    def virtual(self, outputs: dict[str, torch.Tensor], weigh: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        evaluated = self.objective.evaluate(**outputs, group_ids=self.train_group_ids, step=self.step)
        # what the WeightNet reads: the objective's weight_input where it has one, else the losses
        weight_input = getattr(evaluated, "weight_input", None)
        if weight_input is None:
            weight_input = evaluated.per_sample.detach()
        return self.objective.reduce(evaluated, weigh(weight_input), self.normalize).loss

    def meta(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        evaluated = self.objective.evaluate(**outputs, group_ids=self.meta_group_ids, step=self.step)
        return self.objective.reduce(evaluated, None, self.normalize).loss


def _meta_step(model, losses, weight_net, weight_optimizer, train_inputs, meta_inputs, virtual, rates, gradient):
    # the forwards update these copies, never the real BatchNorm statistics
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    weight_parameters = list(weight_net.parameters())
    meta_gradient = _second_order_meta_gradient if gradient == "second_order" else _jvp_meta_gradient
    meta_gradients, virtual_loss, meta_loss, weights = meta_gradient(
        model, losses, weight_net, weight_parameters, train_inputs, meta_inputs, virtual, rates, buffers)
    return _apply_meta_gradient(weight_parameters, weight_optimizer, meta_gradients, virtual_loss, meta_loss, weights)


def _apply_meta_gradient(weight_parameters, weight_optimizer, meta_gradients, virtual_loss, meta_loss,
                         weights) -> MetaStepResult:
    """All-reduce the meta-gradient with a non-finite flag, then step the WeightNet (or skip everywhere)."""
    meta_gradients = [torch.zeros_like(parameter) if grad is None else grad.detach()
                      for parameter, grad in zip(weight_parameters, meta_gradients)]
    local_nonfinite = not (torch.isfinite(virtual_loss.detach()) & torch.isfinite(meta_loss.detach())).item()
    flat = torch.cat([grad.reshape(-1) for grad in meta_gradients]
                     + [meta_gradients[0].new_full((1,), float(local_nonfinite))])
    # each rank holds Σ_r' ∂L_r'/∂Θ_r of every rank's loss; their mean is the single-process
    # meta-gradient, and averaging keeps the WeightNet identical on every rank; the non-finite flag
    # rides along in the same call
    flat = all_reduce_values(flat, average=True)
    result = MetaStepResult(virtual_loss=virtual_loss.item(), meta_loss=meta_loss.item(),
                            weight_mean=weights.mean().item() if weights.numel() else float("nan"))
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


def _second_order_meta_gradient(model, losses, weight_net, weight_parameters, train_inputs, meta_inputs,
                                virtual, rates, buffers):
    """Differentiate L_meta(ŵ(Θ)) through the virtual step (the reference; holds a double-backward graph)."""
    outputs = functional_call(model, (virtual, buffers), args=(), kwargs=train_inputs)
    weights_seen: list[torch.Tensor] = []

    def weigh(per_sample: torch.Tensor) -> torch.Tensor:
        weights = weight_net(per_sample.detach())
        weights_seen.append(weights.detach())
        return weights

    virtual_loss = losses.virtual(outputs, weigh)
    gradients = torch.autograd.grad(virtual_loss, list(virtual.values()), create_graph=True, allow_unused=True)
    # a parameter without a gradient on this rank (the temporal head on an image batch) still joins
    # the all-reduce: another rank may hold one, and a skipped collective hangs the others
    gradients = [torch.zeros_like(parameter) if grad is None else grad
                 for parameter, grad in zip(virtual.values(), gradients)]
    averaged = _average_across_ranks(gradients, differentiable=True)
    stepped = {name: parameter - rates[name] * grad for (name, parameter), grad in zip(virtual.items(), averaged)}

    meta_loss = losses.meta(functional_call(model, (stepped, buffers), args=(), kwargs=meta_inputs))
    meta_gradients = torch.autograd.grad(meta_loss, weight_parameters, allow_unused=True)
    return meta_gradients, virtual_loss, meta_loss, torch.cat(weights_seen) if weights_seen else torch.empty(0)


@functools.cache
def _load_forward_mode() -> None:
    """Load torch's forward-mode decompositions once, without the FutureWarning that loading prints.

    torch compiles them with ``torch.jit.script`` on the first ``make_dual`` of a process, which
    warns that ``torch.jit.script`` is deprecated: torch's own use, nothing a user can act on.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
        with forward_ad.dual_level():
            forward_ad.make_dual(torch.zeros(()), torch.zeros(()))


def _jvp_meta_gradient(model, losses, weight_net, weight_parameters, train_inputs, meta_inputs,
                       virtual, rates, buffers):
    """The same meta-gradient from first-order passes and one forward-mode pass (ARCHITECTURE.md, Meta weighting).

    Θ enters ŵ = w − α·∇_w L_v(w; v(Θ)) only through the weights v, and L_v is linear in the
    per-sample losses, so ∇_Θ L_meta(ŵ) = −∇_Θ [d/dε L_v(w + ε·α⊙g; v(Θ))]_{ε=0} with
    g = ∇_ŵ L_meta(ŵ): the tangent of the weighted virtual loss along α⊙g, differentiated by Θ
    alone (= −α Σ_i c_i ∇_Θ v̄_i with c_i = ⟨g, ∇_w ℓ_i⟩). That tangent comes from one
    forward-mode pass; its graph to Θ is only the WeightNet and the weighting, never the model.
    """
    random_state = _RandomState(next(iter(virtual.values())).device)
    # 1. virtual step: an ordinary backward of the weighted loss, weights detached
    outputs = functional_call(model, (virtual, buffers), args=(), kwargs=train_inputs)
    weights_seen: list[torch.Tensor] = []

    def weigh_detached(per_sample: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            weights = weight_net(per_sample.detach())
        weights_seen.append(weights)
        return weights

    virtual_loss = losses.virtual(outputs, weigh_detached)
    gradients = torch.autograd.grad(virtual_loss, list(virtual.values()), allow_unused=True)
    virtual_loss, outputs = virtual_loss.detach(), None
    meta_gradients, meta_loss = _jvp_from_virtual_gradients(
        model, losses, weight_net, weight_parameters, gradients, train_inputs, meta_inputs, virtual, rates, buffers,
        random_state)
    return meta_gradients, virtual_loss, meta_loss, torch.cat(weights_seen)


def _jvp_from_virtual_gradients(model, losses, weight_net, weight_parameters, gradients, train_inputs, meta_inputs,
                                virtual, rates, buffers, random_state):
    """Steps 2 and 3 of the jvp meta-gradient, from the virtual gradients ∇_w L_v at w (this rank's)."""
    _load_forward_mode()
    names = list(virtual)
    gradients = [torch.zeros_like(parameter) if grad is None else grad
                 for parameter, grad in zip(virtual.values(), gradients)]
    # ŵ = w − α·G written over G: one parameter-sized copy at a time (ViT-B/32: 600 MB each)
    stepped = {name: grad.mul_(-rates[name]).add_(virtual[name].detach()).requires_grad_(True)
               for name, grad in zip(names, _average_across_ranks(gradients, differentiable=False))}
    del gradients

    # 2. g = ∇_ŵ L_meta at the virtually stepped parameters (data-parallel mean)
    meta_loss = losses.meta(functional_call(model, (stepped, buffers), args=(), kwargs=meta_inputs))
    meta_parameter_gradients = torch.autograd.grad(meta_loss, list(stepped.values()), allow_unused=True)
    meta_loss = meta_loss.detach()
    meta_parameter_gradients = [torch.zeros_like(parameter) if grad is None else grad
                                for parameter, grad in zip(stepped.values(), meta_parameter_gradients)]
    del stepped
    # the tangent α⊙g, written over g
    tangents = [grad.mul_(rates[name])
                for name, grad in zip(names, _average_across_ranks(meta_parameter_gradients, differentiable=False))]
    del meta_parameter_gradients

    # 3. tangent of the weighted virtual loss at w along α⊙g, with the weights' graph to Θ kept;
    # the same random draws (dropout) as the virtual forward, so that it is the same function of w
    random_state.restore()
    with forward_ad.dual_level(), torch.no_grad(), _naming_the_layer_without_forward_mode(model):
        duals = {name: forward_ad.make_dual(virtual[name].detach(), tangent)
                 for name, tangent in zip(names, tangents)}
        outputs = functional_call(model, (duals, buffers), args=(), kwargs=train_inputs)

        def weigh(per_sample: torch.Tensor) -> torch.Tensor:
            with torch.enable_grad():
                return weight_net(forward_ad.unpack_dual(per_sample).primal)

        with torch.enable_grad():
            dual_loss = losses.virtual(outputs, weigh)
            tangent = forward_ad.unpack_dual(dual_loss).tangent
    if tangent is None or not tangent.requires_grad:  # nothing of this rank's loss depends on Θ or w
        return [None] * len(weight_parameters), meta_loss
    return torch.autograd.grad(-tangent, weight_parameters, allow_unused=True), meta_loss


class _RandomState:
    """The global RNG state at construction, to replay the same random draws later."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu = torch.random.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def restore(self) -> None:
        torch.random.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


class ForwardModeUnsupportedError(RuntimeError):
    """A layer of the model has no forward-mode derivative: ``meta.gradient: jvp`` cannot run on it."""


@contextlib.contextmanager
def _naming_the_layer_without_forward_mode(model: nn.Module) -> Iterator[None]:
    """Turn PyTorch's "no forward AD formula" errors into one naming the layer that raised it."""
    names = {module: name for name, module in model.named_modules()}
    entered: list[str] = []

    def pre_hook(module, args):
        if module in names:
            entered.append(names[module] or type(module).__name__)

    def post_hook(module, args, output):
        if module in names and entered:
            entered.pop()

    handles = [module.register_forward_pre_hook(pre_hook) for module in names]
    handles += [module.register_forward_hook(post_hook) for module in names]
    try:
        yield
    except (RuntimeError, NotImplementedError) as error:
        message = str(error)
        if "forward AD" not in message and "forward-mode" not in message and "jvp" not in message.lower():
            raise
        layer = entered[-1] if entered else "<unknown>"
        kind = type(dict(model.named_modules()).get(layer, model)).__name__
        raise ForwardModeUnsupportedError(
            f"meta.gradient=jvp: layer {layer!r} ({kind}) has no forward-mode derivative ({message.splitlines()[0]}); "
            f"set meta.gradient: second_order for this model") from error
    finally:
        for handle in handles:
            handle.remove()


def _average_across_ranks(gradients: list[torch.Tensor], differentiable: bool) -> list[torch.Tensor]:
    """Mean over ranks in one all-reduce: the virtual step uses the data-parallel gradient."""
    world_size = world_info().world_size
    if world_size == 1:
        return gradients
    flat = torch.cat([gradient.reshape(-1) for gradient in gradients])
    flat = all_reduce_with_grad(flat) / world_size if differentiable else all_reduce_values(flat, average=True)
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
