"""``meta.gradient: jvp`` against the second-order reference: the same WeightNet update, in float64."""

from __future__ import annotations

import pytest
import torch

from mmsphere.config import config_from_dict
from mmsphere.losses import Objective
from mmsphere.models import create_model
from mmsphere.weighting import WeightNet, meta_step
from mmsphere.weighting.meta import ForwardModeUnsupportedError


def _config(name: str, params: str, normalize: str, temporal_head: str = "transformer"):
    return config_from_dict({
        "model": {"name": name, "temporal_head": temporal_head, "max_frames": 4},
        "data": {"train": [{"urls": "unused.tar"}], "meta": {"urls": "unused.tar"}, "frames": 3},
        "loss": {"terms": {"angular_margin": 1.0}},
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


def _meta_update(name, params, normalize, gradient, train_modality="image", meta_modality="image"):
    """The WeightNet's change after one meta step with plain SGD at lr 1 (= minus the meta-gradient)."""
    config = _config(name, params, normalize)
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
                       normalize=normalize)
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


@pytest.mark.parametrize("train_modality, meta_modality", [("video", "video"), ("image", "video")])
def test_jvp_equals_second_order_with_a_temporal_head(train_modality, meta_modality):
    """Video batches through the transformer temporal head, and an image batch that leaves it without gradient."""
    reference, _ = _meta_update("mmsphere-tiny", "all", "sum", "second_order", train_modality, meta_modality)
    jvp, _ = _meta_update("mmsphere-tiny", "all", "sum", "jvp", train_modality, meta_modality)
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
