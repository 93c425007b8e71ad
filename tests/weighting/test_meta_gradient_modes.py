"""The meta-gradient on the real dual encoder, in float64: against central finite differences through a
virtual step written out here, and ``meta.gradient: jvp`` against the second-order mode."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
import torch.nn.functional as F

from mmsphere.train.config import config_from_dict
from mmsphere.losses import Objective
from mmsphere.models import create_model
from mmsphere.weighting import WeightNet, meta_step
from mmsphere.weighting.meta import ForwardModeUnsupportedError


def _config(name: str, params: str, normalize: str, temporal_head: str = "transformer", margin: float = 0.1,
            terms: dict | None = None):
    return config_from_dict({
        "model": {"name": name, "temporal_head": temporal_head, "max_frames": 4},
        "data": {"train": [{"urls": "unused.tar"}], "meta": {"urls": "unused.tar"}, "frames": 3},
        "loss": {"terms": terms or {"angular_margin": {"weight": 1.0, "margin": margin}}},
        "meta": {"enabled": True, "params": params, "normalize": normalize, "hidden": 8},
        "train": {"batch_size": 8, "cpu": True},
    })


def _batch(modality: str, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(1, 400, (6, 16), generator=generator)
    if modality == "image":
        return {"text": text, "images": torch.randn(6, 3, 32, 32, generator=generator, dtype=torch.float64)}
    mask = torch.ones(6, 3, dtype=torch.bool)
    mask[::2, -1] = False
    return {"text": text, "frames": torch.randn(6, 3, 3, 32, 32, generator=generator, dtype=torch.float64),
            "frame_mask": mask}


def _meta_update(name, params, normalize, gradient, train_modality="image", meta_modality="image", terms=None):
    """The WeightNet's change after one meta step with plain SGD at lr 1 (= minus the meta-gradient)."""
    config = _config(name, params, normalize, terms=terms)
    torch.manual_seed(0)
    network = create_model(config.model).double()
    network.train()
    objective = Objective(config.loss)
    torch.manual_seed(1)
    weight_net = WeightNet(8).double()
    before = [parameter.detach().clone() for parameter in weight_net.parameters()]
    optimizer = torch.optim.SGD(weight_net.parameters(), lr=1.0)
    names = network.meta_parameter_names(params, 1)
    # different rates per tensor, as the optimiser's groups give them
    rates = {parameter_name: 0.5 if index % 2 else 0.2 for index, parameter_name in enumerate(names)}
    state = {key: value.clone() for key, value in network.state_dict().items()}
    result = meta_step(network, objective, weight_net, optimizer, _batch(train_modality, 2),
                       _batch(meta_modality, 3), parameter_names=names, virtual_lr=rates, gradient=gradient,
                       normalize=normalize, step=30)
    for key, value in network.state_dict().items():  # neither mode touches the real model
        assert torch.equal(value, state[key]), key
    return [after.detach() - start for after, start in zip(weight_net.parameters(), before)], result


@pytest.mark.parametrize("normalize", ["mean", "sum"])
@pytest.mark.parametrize("params", ["all", "last_blocks", "heads"])
@pytest.mark.parametrize("name", ["mmsphere-tiny", "mmsphere-tiny-rn"])
def test_jvp_equals_second_order_in_float64(name, params, normalize):
    reference, reference_result = _meta_update(name, params, normalize, "second_order")
    jvp, jvp_result = _meta_update(name, params, normalize, "jvp")
    assert max(update.abs().max() for update in reference) > 1e-9, "the meta-gradient should not vanish here"
    for expected, actual in zip(reference, jvp):
        torch.testing.assert_close(actual, expected, rtol=1e-8, atol=1e-12)
    assert jvp_result.virtual_loss == pytest.approx(reference_result.virtual_loss, rel=1e-12)
    assert jvp_result.meta_loss == pytest.approx(reference_result.meta_loss, rel=1e-12)


# the margin family: its own weight input (SFace), norms (SphereFace-R soft), a bias (SphereFace2), a schedule
FAMILY_TERMS = {
    "sface": {"sface": {"weight": 1.0, "scale": 12.0}},
    "sphereface_r_soft": {"sphereface_r": {"weight": 1.0, "margin": 1.3, "normalization": "soft", "norm_target": 2.0}},
    "sphereface2": {"sphereface2": {"weight": 1.0, "variant": "A", "margin": 0.2}},
    "cam_softmax": {"cam_softmax": {"weight": 1.0, "c_start": 1.5, "c_stop": 1.0, "c_decay": 0.01}},
    "arcface": {"arcface": {"weight": 1.0, "margin": 0.3}},
}


@pytest.mark.parametrize("terms", list(FAMILY_TERMS))
def test_jvp_equals_second_order_for_the_margin_family(terms):
    reference, reference_result = _meta_update("mmsphere-tiny", "all", "mean", "second_order", terms=FAMILY_TERMS[terms])
    jvp, jvp_result = _meta_update("mmsphere-tiny", "all", "mean", "jvp", terms=FAMILY_TERMS[terms])
    assert max(update.abs().max() for update in reference) > 1e-9, "the meta-gradient should not vanish here"
    for expected, actual in zip(reference, jvp):
        torch.testing.assert_close(actual, expected, rtol=1e-8, atol=1e-12)
    assert jvp_result.meta_loss == pytest.approx(reference_result.meta_loss, rel=1e-12)


MARGIN = 0.1


def _angular_margin_per_sample(outputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """ℓ_i = ½[CE(L)_i + CE(Lᵀ)_i] with positives s·cos(θ_ii − m) (ARCHITECTURE.md, Objective; MAMA, ECCV 2024), written out here, not mmsphere's."""
    image, text, scale = outputs["image_features"], outputs["text_features"], outputs["logit_scale"]
    cosine = image @ text.T
    angle = torch.arccos(cosine.diagonal().clamp(-1 + 1e-6, 1 - 1e-6))
    eye = torch.eye(len(cosine), dtype=torch.bool)
    logits = torch.where(eye, scale * torch.cos(angle - MARGIN).diag_embed(), scale * cosine)
    labels = torch.arange(len(cosine))
    return 0.5 * (F.cross_entropy(logits, labels, reduction="none") + F.cross_entropy(logits.T, labels, reduction="none"))


def _weight_net_formula(theta: torch.Tensor, losses: torch.Tensor, hidden: int) -> torch.Tensor:
    """V(ℓ; Θ) = sigmoid(W₂·ReLU(W₁ℓ + b₁) + b₂), Θ flat in WeightNet's parameter order (W₁, b₁, W₂, b₂)."""
    w1, b1, w2, b2 = theta[:hidden], theta[hidden:2 * hidden], theta[2 * hidden:3 * hidden], theta[3 * hidden]
    return torch.sigmoid(torch.relu(losses[:, None] * w1 + b1) @ w2 + b2)


def _meta_loss_after_virtual_step(network, theta, hidden, train_inputs, meta_inputs, rates, normalize) -> float:
    """L_meta(ŵ(Θ)): ŵ = w − α⊙∇_w Σ_i v̄_i·ℓ_i(w), v̄ = V(ℓ.detach(); Θ)/n or /Σ_j V_j; then the mean meta ℓ.

    The step is taken on the model's own parameters in place and undone afterwards: no functional
    call, no code of mmsphere's meta step.
    """
    parameters = dict(network.named_parameters())
    losses = _angular_margin_per_sample(network(**train_inputs))
    weights = _weight_net_formula(theta, losses.detach(), hidden)
    normalized = weights / len(weights) if normalize == "mean" else weights / weights.sum()
    gradients = torch.autograd.grad((normalized * losses).sum(), [parameters[name] for name in rates])
    saved = {name: parameters[name].detach().clone() for name in rates}
    try:
        with torch.no_grad():
            for (name, rate), gradient in zip(rates.items(), gradients):
                parameters[name].sub_(rate * gradient)
            return _angular_margin_per_sample(network(**meta_inputs)).mean().item()
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                parameters[name].copy_(value)


@pytest.mark.parametrize("normalize", ["mean", "sum"])
def test_meta_gradient_equals_central_finite_differences(normalize):
    """Both modes against (L_meta(ŵ(Θ + εe_k)) − L_meta(ŵ(Θ − εe_k)))/2ε, nothing shared with the meta step.

    The jvp-versus-second-order comparison above cannot see an error in what the two modes share
    (the reducer's normalisation, the objective, the per-parameter rates); this one can.
    """
    config = _config("mmsphere-tiny", "all", normalize, temporal_head="mean", margin=MARGIN)
    torch.manual_seed(0)
    network = create_model(config.model).double()
    network.train()
    hidden = 8
    torch.manual_seed(1)
    initial = WeightNet(hidden).double().state_dict()
    theta = torch.cat([value.flatten() for value in initial.values()])
    train_inputs, meta_inputs = _batch("image", 2), _batch("image", 3)
    names = network.meta_parameter_names("all")
    rates = {name: 0.5 if index % 2 else 0.2 for index, name in enumerate(names)}

    epsilon = 1e-5
    numeric = torch.zeros_like(theta)
    for index in range(theta.numel()):
        step = torch.zeros_like(theta)
        step[index] = epsilon
        numeric[index] = (
            _meta_loss_after_virtual_step(network, theta + step, hidden, train_inputs, meta_inputs, rates, normalize)
            - _meta_loss_after_virtual_step(network, theta - step, hidden, train_inputs, meta_inputs, rates, normalize)
        ) / (2 * epsilon)
    assert numeric.abs().max() > 1e-4, "the meta-gradient should not vanish in this set-up"

    for gradient in ("jvp", "second_order"):
        weight_net = WeightNet(hidden).double()
        weight_net.load_state_dict(initial)
        # plain SGD at lr 1: the WeightNet's change is minus the meta-gradient
        optimizer = torch.optim.SGD(weight_net.parameters(), lr=1.0)
        meta_step(network, Objective(config.loss), weight_net, optimizer, train_inputs, meta_inputs,
                  parameter_names=names, virtual_lr=rates, gradient=gradient, normalize=normalize)
        analytic = theta - torch.cat([parameter.detach().flatten() for parameter in weight_net.parameters()])
        torch.testing.assert_close(analytic, numeric, rtol=0, atol=1e-6 * numeric.abs().max().item(),
                                   msg=lambda message: f"meta.gradient={gradient}: {message}")


@pytest.mark.parametrize("train_modality, meta_modality", [("video", "video"), ("image", "video")])
def test_jvp_equals_second_order_with_a_temporal_head(train_modality, meta_modality):
    """Video batches through the transformer temporal head, and an image batch that leaves it without gradient."""
    reference, _ = _meta_update("mmsphere-tiny", "all", "sum", "second_order", train_modality, meta_modality)
    jvp, _ = _meta_update("mmsphere-tiny", "all", "sum", "jvp", train_modality, meta_modality)
    for expected, actual in zip(reference, jvp):
        torch.testing.assert_close(actual, expected, rtol=1e-8, atol=1e-12)


def test_jvp_equals_second_order_under_dropout(tmp_path):
    """With patch dropout in the image tower, the forward-mode pass must replay the virtual forward's draws
    (otherwise it differentiates another function of w)."""
    architecture = open_clip.get_model_config("mmsphere-tiny")
    architecture["vision_cfg"]["patch_dropout"] = 0.5
    name = tmp_path / "tiny-patch-dropout.json"
    name.write_text(json.dumps(architecture))
    network = create_model(_config(str(name), "all", "mean").model).train()
    inputs = {key: value.float() if value.is_floating_point() else value for key, value in _batch("image", 2).items()}
    assert not torch.equal(network(**inputs)["image_features"], network(**inputs)["image_features"]), "dropout draws"
    reference, _ = _meta_update(str(name), "all", "mean", "second_order")
    jvp, _ = _meta_update(str(name), "all", "mean", "jvp")
    assert max(update.abs().max() for update in reference) > 1e-9
    for expected, actual in zip(reference, jvp):
        torch.testing.assert_close(actual, expected, rtol=1e-8, atol=1e-12)


def test_a_layer_without_a_forward_mode_rule_is_named():
    class NoForwardMode(torch.autograd.Function):
        @staticmethod
        def forward(ctx, tensor):
            return tensor * 1.0

        @staticmethod
        def backward(ctx, grad):
            return grad

    class Opaque(torch.nn.Module):
        def forward(self, tensor):
            return NoForwardMode.apply(tensor)

    config = _config("mmsphere-tiny", "all", "mean")
    network = create_model(config.model)
    network.clip.visual.ln_post = torch.nn.Sequential(network.clip.visual.ln_post, Opaque())
    objective = Objective(config.loss)
    weight_net = WeightNet(8)
    inputs = {key: value.float() if value.is_floating_point() else value for key, value in _batch("image", 2).items()}
    with pytest.raises(ForwardModeUnsupportedError, match=r"clip\.visual\.ln_post\.1.*Opaque.*second_order"):
        meta_step(network, objective, weight_net, torch.optim.SGD(weight_net.parameters(), lr=1.0), inputs, inputs,
                  parameter_names=network.meta_parameter_names("all"), virtual_lr=0.1, gradient="jvp")


def test_unknown_gradient_mode_names_the_choices():
    with pytest.raises(Exception, match="meta.gradient='exact' must be 'jvp' or 'second_order'"):
        config_from_dict({"data": {"train": [{"urls": "x.tar"}]}, "meta": {"gradient": "exact"}})
