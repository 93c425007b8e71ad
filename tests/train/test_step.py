"""One optimisation step: the clamps of the logit scale and bias, and what the optimiser receives.

The gradients the optimiser is handed are compared with those of a transcription of the weighted
loss written here (ARCHITECTURE.md, Meta weighting, step 3), with clipping to the global norm; the meta iteration's rates
with the ones written out from the config.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from mmsphere.train.config import config_from_dict
from mmsphere.data import Batch
from mmsphere.losses import Objective
from mmsphere.models import create_model
from mmsphere.train.loop import build_accelerator
from mmsphere.train.optim import build_optimizer, cosine_schedule
from mmsphere.train.step import optimization_step
from mmsphere.train.task import Task
from mmsphere.weighting import MetaWeighting, WeightNet

# the documented ranges, written out rather than imported: log s in [0, ln 100] (ARCHITECTURE.md, Objective; MAMA, ECCV 2024), and the
# bias within the largest logit magnitude s ≤ 100, |b| ≤ 100
LOG_SCALE_RANGE = (0.0, math.log(100.0))
BIAS_RANGE = (-100.0, 100.0)


def _one_step(log_scale: float, bias: float):
    """The network after one real step of SigLIP training that starts from ``log_scale`` and ``bias``."""
    config = config_from_dict({
        "model": {"name": "mmsphere-tiny", "init_logit_bias": -10.0},
        "data": {"train": [{"urls": "unused.tar", "modality": "image"}]},
        "loss": {"terms": {"siglip": 1.0}},
        "train": {"batch_size": 8, "lr": 1e-3, "warmup_steps": 0, "max_steps": 10, "grad_clip": None, "cpu": True},
    })
    torch.manual_seed(0)
    network = create_model(config.model)
    with torch.no_grad():
        network.clip.logit_scale.fill_(log_scale)
        network.clip.logit_bias.fill_(bias)
    accelerator = build_accelerator(config)
    optimizer = build_optimizer(network, config)
    scheduler = cosine_schedule(optimizer, 0, config.train.max_steps)
    model, optimizer = accelerator.prepare(network, optimizer)
    generator = torch.Generator().manual_seed(1)
    text = torch.randint(1, 400, (8, 16), generator=generator)
    batch = Batch("image", torch.randn(8, 3, 32, 32, generator=generator), text=text)
    before = {name: parameter.detach().clone() for name, parameter in network.named_parameters()}
    task = Task.from_config(config, network, accelerator, model=model, scheduler=scheduler)
    outcome = optimization_step(task, batch, optimizer, step=0)
    assert not outcome.skipped
    moved = [name for name, parameter in network.named_parameters() if not torch.equal(parameter, before[name])]
    assert "clip.visual.proj" in moved and "clip.text_projection" in moved, "the step did update the model"
    return network, outcome


@pytest.mark.parametrize("side", [0, 1], ids=["below", "above"])
def test_logit_scale_and_bias_are_clamped_to_their_ranges_after_a_step(side):
    """Started 1 (log scale) and 50 (bias) beyond a bound, one Adam step at lr 1e-3 cannot bring them back: the clamp does."""
    outside = (-1.0, LOG_SCALE_RANGE[1] + 1.0)[side], (-150.0, 150.0)[side]
    network, outcome = _one_step(*outside)
    assert outcome.output.loss.isfinite()  # a real step, not a skipped one (a skipped step clamps nothing)
    log_scale, bias = network.clip.logit_scale.item(), network.clip.logit_bias.item()
    assert log_scale == pytest.approx(LOG_SCALE_RANGE[side], abs=1e-6)
    assert bias == pytest.approx(BIAS_RANGE[side], abs=1e-5)


def test_values_inside_the_ranges_are_left_to_the_optimiser():
    """Inside the ranges the clamp does nothing: the step moves scale and bias by about lr (Adam's first step)."""
    network, _ = _one_step(2.0, -10.0)
    for value, start in ((network.clip.logit_scale.item(), 2.0), (network.clip.logit_bias.item(), -10.0)):
        assert 0 < abs(value - start) <= 1.1e-3


# --------------------------------------------------------------------------------------------
# what the real step backpropagates and hands to the optimiser, against a transcription here

MARGIN = 0.1


def _angular_margin_per_sample(outputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """ℓ_i = ½[CE(L)_i + CE(Lᵀ)_i], positives s·cos(θ_ii − m) (ARCHITECTURE.md, Objective; MAMA, ECCV 2024), written out here, not mmsphere's."""
    image, text, scale = outputs["image_features"], outputs["text_features"], outputs["logit_scale"]
    cosine = image @ text.T
    angle = torch.arccos(cosine.diagonal().clamp(-1 + 1e-6, 1 - 1e-6))
    logits = torch.where(torch.eye(len(cosine), dtype=torch.bool), scale * torch.cos(angle - MARGIN).diag_embed(),
                         scale * cosine)
    labels = torch.arange(len(cosine))
    return 0.5 * (torch.nn.functional.cross_entropy(logits, labels, reduction="none")
                  + torch.nn.functional.cross_entropy(logits.T, labels, reduction="none"))


def _weight_net_formula(weight_net: torch.nn.Module, losses: torch.Tensor) -> torch.Tensor:
    """V(ℓ; Θ) = sigmoid(W₂·ReLU(W₁ℓ + b₁) + b₂) from the WeightNet's current parameters."""
    w1, b1, w2, b2 = (parameter.detach().double().reshape(-1) for parameter in weight_net.parameters())
    return torch.sigmoid(torch.relu(losses.double()[:, None] * w1 + b1) @ w2 + b2)


def _batch(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"text": torch.randint(1, 400, (8, 16), generator=generator),
            "images": torch.randn(8, 3, 32, 32, generator=generator, dtype=torch.float64)}


def _as_batch(inputs: dict[str, torch.Tensor]) -> Batch:
    return Batch("image", inputs["images"], text=inputs["text"])


def _spied_step(meta: dict | None = None, **train):
    """One float64 optimisation step of the tiny model (meta weighting if ``meta``), recording what it used.

    Returns the config, the network before the step, the gradients the optimiser received, the step's
    outcome and the MetaWeighting (its WeightNet optimiser is SGD at lr 1, so that its update is
    minus the meta-gradient itself: Adam's first step would only see its sign).
    """
    config = config_from_dict({
        "model": {"name": "mmsphere-tiny", "text_lr": 1e-3},
        "data": {"train": [{"urls": "unused.tar", "modality": "image"}],
                 "meta": {"urls": "unused.tar", "modality": "image"}},
        "loss": {"terms": {"angular_margin": {"weight": 1.0, "margin": MARGIN}}},
        "meta": {"enabled": meta is not None, "params": "heads", "hidden": 8, **(meta or {})},
        "train": {"batch_size": 8, "lr": 1e-2, "warmup_steps": 0, "max_steps": 10, "grad_clip": None, "cpu": True,
                  **train},
    })
    torch.manual_seed(0)
    network = create_model(config.model).double()
    before = copy.deepcopy(network)
    objective = Objective(config.loss)
    weighting = None
    if meta is not None:
        torch.manual_seed(1)
        weighting = MetaWeighting(config, network, objective)
        weighting.weight_net.double()
        weighting.optimizer = torch.optim.SGD(weighting.weight_net.parameters(), lr=1.0)
    accelerator = build_accelerator(config)
    optimizer = build_optimizer(network, config)
    scheduler = cosine_schedule(optimizer, config.train.warmup_steps, config.train.max_steps)
    model, optimizer = accelerator.prepare(network, optimizer)
    received: dict[str, torch.Tensor] = {}
    names = {id(parameter): name for name, parameter in network.named_parameters()}
    step = optimizer.step

    def recording_step(*args, **kwargs):
        for group in optimizer.param_groups:
            for parameter in group["params"]:
                if parameter.grad is not None:
                    received[names[id(parameter)]] = parameter.grad.detach().clone()
        return step(*args, **kwargs)

    optimizer.step = recording_step
    task = Task.from_config(config, network, accelerator, model=model, objective=objective, weighting=weighting,
                            scheduler=scheduler)
    outcome = optimization_step(task, _as_batch(_batch(2)), optimizer,
                                meta_batch=_as_batch(_batch(3)) if meta is not None else None, step=0)
    assert not outcome.skipped and received
    return config, before, received, outcome, weighting


def _expected_loss_and_gradients(config, before, weights_of=None):
    """The reduced loss on the batch at the pre-step parameters and its gradient, from the transcription above."""
    per_sample = _angular_margin_per_sample(before(**_batch(2)))
    if weights_of is None:
        weights, loss = None, per_sample.mean()
    else:
        weights = weights_of(per_sample.detach())
        total = len(weights) if config.meta.normalize == "mean" else weights.sum()
        loss = (weights * per_sample).sum() / total
    parameters = dict(before.named_parameters())
    gradients = dict(zip(parameters, torch.autograd.grad(loss, list(parameters.values()))))
    return loss.detach(), weights, gradients


@pytest.mark.parametrize("normalize", ["mean", "sum"])
def test_the_real_step_backpropagates_the_weighted_loss_of_the_updated_weight_net(normalize):
    """Step 3 of ARCHITECTURE.md, Meta weighting: (1/n) Σ v_i·ℓ_i or Σ v_i·ℓ_i / Σ v_i, v = V(ℓ.detach(); Θ) after the meta update."""
    config, before, received, outcome, weighting = _spied_step(meta={"normalize": normalize, "virtual_lr": 0.5})
    assert _moved(weighting.weight_net), "the meta iteration did update the WeightNet"
    loss, weights, gradients = _expected_loss_and_gradients(
        config, before, lambda losses: _weight_net_formula(weighting.weight_net, losses))
    assert weights.std() > 1e-4, "the weights differ between samples, so the normalisation matters"
    # the real step feeds the WeightNet fp32 losses (MetaWeighting.weights): agreement to fp32 rounding
    torch.testing.assert_close(outcome.output.weights.double(), weights, rtol=1e-6, atol=0)
    torch.testing.assert_close(outcome.output.loss.detach(), loss, rtol=1e-6, atol=0)
    assert received.keys() == gradients.keys()
    for name, gradient in gradients.items():
        torch.testing.assert_close(received[name], gradient, rtol=0, atol=1e-6 * gradient.abs().max().item(), msg=name)
    assert all(parameter.grad is None for parameter in weighting.weight_net.parameters()), "no gradient into Θ"


def test_gradients_are_clipped_to_the_configured_global_norm():
    """g·min(1, c/‖g‖) over all parameters together (train.grad_clip), against the unclipped gradient."""
    config, before, received, _, _ = _spied_step(grad_clip=1e-3)
    _, _, gradients = _expected_loss_and_gradients(config, before)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in gradients.values()]))
    assert norm > 1e-2, "the clip must bite in this set-up"
    for name, gradient in gradients.items():
        torch.testing.assert_close(received[name], gradient * (1e-3 / norm), rtol=1e-6, atol=1e-15, msg=name)
    # a bound above the norm leaves the gradient alone
    config, before, received, _, _ = _spied_step(grad_clip=10 * norm.item())
    for name, gradient in gradients.items():
        torch.testing.assert_close(received[name], gradient, rtol=1e-8, atol=1e-12, msg=name)


@pytest.mark.parametrize("virtual_lr", [0.3, None], ids=["meta.virtual_lr", "current_group_rates"])
def test_the_virtual_step_takes_the_configured_rate_or_each_groups_current_one(virtual_lr):
    """meta.virtual_lr when set; else each parameter's group rate now: warmup step 1 of 4 = ¼ of train.lr or text_lr."""
    config, _, _, _, weighting = _spied_step(meta={"virtual_lr": virtual_lr}, warmup_steps=4)
    stepped = [parameter.detach().clone() for parameter in weighting.weight_net.parameters()]
    torch.manual_seed(0)
    network = create_model(config.model).double()
    torch.manual_seed(1)
    reference = MetaWeighting(config, network, Objective(config.loss))
    reference.weight_net.double()
    reference.optimizer = torch.optim.SGD(reference.weight_net.parameters(), lr=1.0)
    # written out from the config, not read from the optimiser: mmsphere-tiny's text tower at text_lr
    rates = {name: (virtual_lr if virtual_lr is not None
                    else 0.25 * (1e-3 if network.tower_of(name) == "text" else 1e-2))
             for name in reference.parameter_names}
    assert {network.tower_of(name) for name in rates} >= {"image", "text"}
    reference.meta_step(_batch(2), _batch(3), virtual_lr=rates)
    assert _moved(reference.weight_net)
    for actual, expected in zip(stepped, reference.weight_net.parameters()):
        torch.testing.assert_close(actual, expected.detach(), rtol=1e-10, atol=1e-14)


def _moved(weight_net: torch.nn.Module) -> bool:
    """Whether ``weight_net`` differs from the WeightNet that seed 1 gives (where _spied_step starts it)."""
    torch.manual_seed(1)
    start = WeightNet(8).double()
    return any(not torch.equal(a.detach(), b.detach()) for a, b in zip(weight_net.parameters(), start.parameters()))
