"""The meta step on the real dual encoder: what it may not change (buffers, precision, the WeightNet on bad input)."""

from __future__ import annotations

import copy
import json

import open_clip
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from mmsphere.train.config import config_from_dict
from mmsphere.losses import Objective
from mmsphere.models import create_model
from mmsphere.weighting import MetaWeighting
from mmsphere.train.optim import build_optimizer
from mmsphere.weighting import meta_step


def _config(name: str = "mmsphere-tiny", **model):
    return config_from_dict({
        "model": {"name": name, **model},
        "data": {"train": [{"urls": "unused.tar", "modality": "image"}], "meta": {"urls": "unused.tar", "modality": "image"}},
        "loss": {"terms": {"angular_margin": 1.0}},
        "meta": {"enabled": True, "params": "all", "hidden": 8, "lr": 0.05},
        "train": {"batch_size": 8, "lr": 1e-2, "warmup_steps": 0, "max_steps": 10, "cpu": True},
    })


def _batch(seed: int, size: int = 6) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"text": torch.randint(1, 400, (size, 16), generator=generator),
            "images": torch.randn(size, 3, 32, 32, generator=generator)}


def _weighting(name: str = "mmsphere-tiny", **model):
    config = _config(name, **model)
    torch.manual_seed(0)
    network = create_model(config.model)
    return config, network, MetaWeighting(config, network, Objective(config.loss))


def test_meta_step_leaves_batchnorm_statistics_untouched():
    """Both forwards run on copies of the buffers (Meta-Weight-Net runs them on a copy of the model)."""
    _, network, weighting = _weighting("mmsphere-tiny-rn")
    network.train()
    before = {name: buffer.clone() for name, buffer in network.named_buffers()}
    assert any("running_mean" in name for name in before)
    net_before = [parameter.clone() for parameter in weighting.weight_net.parameters()]
    result = weighting.meta_step(_batch(1), _batch(2), virtual_lr=0.1)
    assert not result.skipped
    for name, buffer in network.named_buffers():
        torch.testing.assert_close(buffer, before[name], rtol=0, atol=0, msg=name)
    # the iteration did take place: the WeightNet moved
    assert any((after - start).abs().max() > 0 for after, start in zip(weighting.weight_net.parameters(), net_before))


def patch_dropout_architecture(directory) -> str:
    """mmsphere-tiny with open_clip's patch dropout (random draws in every training forward), as a JSON file."""
    architecture = open_clip.get_model_config("mmsphere-tiny")
    architecture["vision_cfg"]["patch_dropout"] = 0.5
    path = directory / "tiny-patch-dropout.json"
    path.write_text(json.dumps(architecture))
    return str(path)


def test_meta_step_leaves_the_real_steps_random_draws_alone(tmp_path):
    """The meta forwards draw from a forked RNG: after a meta iteration, the real forward drops the patches it
    would have dropped without one (ARCHITECTURE.md, Meta weighting)."""
    _, network, weighting = _weighting(patch_dropout_architecture(tmp_path))
    network.train()
    torch.manual_seed(7)
    without_meta = network(**_batch(1))["image_features"]
    torch.manual_seed(8)
    assert not torch.equal(network(**_batch(1))["image_features"], without_meta), "the forward draws a dropout mask"
    torch.manual_seed(7)
    assert not weighting.meta_step(_batch(1), _batch(2), virtual_lr=0.1).skipped
    torch.testing.assert_close(network(**_batch(1))["image_features"], without_meta, rtol=0, atol=0)


def test_meta_step_skips_a_non_finite_batch_and_leaves_the_weight_net_alone():
    _, network, weighting = _weighting()
    weighting.meta_step(_batch(1), _batch(2), virtual_lr=0.1)  # Adam has state now
    net_before = copy.deepcopy(weighting.weight_net.state_dict())
    optimizer_before = copy.deepcopy(weighting.optimizer.state_dict())
    poisoned = _batch(3)
    poisoned["images"][2] = float("nan")
    result = weighting.meta_step(poisoned, _batch(4), virtual_lr=0.1)
    assert result.skipped
    for name, value in weighting.weight_net.state_dict().items():
        torch.testing.assert_close(value, net_before[name], rtol=0, atol=0)
    after = weighting.optimizer.state_dict()
    for index, state in optimizer_before["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(after["state"][index][key], value, rtol=0, atol=0)
    assert all(torch.isfinite(weighting.weight_net(torch.rand(5))).tolist())
    # a clean batch afterwards updates it again
    assert not weighting.meta_step(_batch(5), _batch(6), virtual_lr=0.1).skipped


def test_each_parameter_takes_its_virtual_step_at_its_own_group_rate():
    config, network, weighting = _weighting(image_lr=1e-3, text_lr=1e-6)
    optimizer = build_optimizer(network, config)
    rates = weighting.group_rates(optimizer)
    towers = {name: network.tower_of(name) for name in rates}
    assert {rates[name] for name in rates if towers[name] == "image"} == {1e-3}
    assert {rates[name] for name in rates if towers[name] == "text"} == {1e-6}


def test_a_rate_per_parameter_moves_exactly_those_parameters():
    """Rate 0 everywhere but one tensor equals a virtual step over that tensor alone (independent path)."""
    config, network, _ = _weighting()
    network = network.double()
    names = [name for name, _ in network.named_parameters()]
    chosen = next(name for name in names if name.startswith("clip.visual") and name.endswith("proj"))
    objective = Objective(config.loss)

    updates = []
    for parameter_names, rate in ((names, {name: (0.3 if name == chosen else 0.0) for name in names}),
                                  ([chosen], 0.3)):
        torch.manual_seed(5)
        from mmsphere.weighting import WeightNet

        weight_net = WeightNet(8).double()
        optimizer = torch.optim.SGD(weight_net.parameters(), lr=1.0)
        before = [parameter.clone() for parameter in weight_net.parameters()]
        train_inputs = {key: value.double() if value.is_floating_point() else value for key, value in _batch(1).items()}
        meta_inputs = {key: value.double() if value.is_floating_point() else value for key, value in _batch(2).items()}
        meta_step(network, objective, weight_net, optimizer, train_inputs, meta_inputs,
                  parameter_names=parameter_names, virtual_lr=rate)
        updates.append([after - start for after, start in zip(weight_net.parameters(), before)])
    assert any(update.abs().max() > 0 for update in updates[1])
    for with_mapping, alone in zip(*updates):
        torch.testing.assert_close(with_mapping, alone, rtol=1e-10, atol=1e-14)


@pytest.fixture
def bf16_accelerator():
    """A real accelerate set-up with CPU bf16 autocast (accelerate's state is process-wide: reset around it)."""
    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    yield accelerator
    AcceleratorState._reset_state(reset_partial_state=True)


def test_meta_step_runs_in_fp32_even_when_accelerate_wrapped_the_forward_in_autocast(bf16_accelerator):
    config, network, weighting = _weighting("mmsphere-tiny-rn")
    optimizer = build_optimizer(network, config)
    model, optimizer = bf16_accelerator.prepare(network, optimizer)
    network = bf16_accelerator.unwrap_model(model)
    seen: list[torch.dtype] = []
    first_conv = next(module for module in network.modules() if isinstance(module, torch.nn.Conv2d))
    handle = first_conv.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    try:
        # the real forward is autocast: the hook sees bf16 there ...
        model(**_batch(1))
        assert seen == [torch.bfloat16]
        seen.clear()
        # ... and fp32 in every forward of the meta step (virtual, meta and, with jvp, forward-mode)
        weighting.meta_step(_batch(1), _batch(2), virtual_lr=weighting.group_rates(optimizer))
        assert seen == [torch.float32] * (3 if weighting.config.meta.gradient == "jvp" else 2)
        # the wrapper is back in place afterwards
        model(**_batch(1))
        assert seen[-1] == torch.bfloat16
    finally:
        handle.remove()


def test_encoder_features_are_unit_norm_in_fp32_under_cpu_bf16_autocast():
    torch.manual_seed(0)
    network = create_model(_config().model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = network(**_batch(1))
        frames = torch.randn(4, 3, 3, 32, 32)
        video = network(text=_batch(1, 4)["text"], frames=frames, frame_mask=torch.ones(4, 3, dtype=torch.bool))
    for features in (outputs["image_features"], outputs["text_features"], video["image_features"]):
        assert features.dtype == torch.float32
        norms = torch.linalg.vector_norm(features.double(), dim=1)
        torch.testing.assert_close(norms, torch.ones_like(norms), rtol=0, atol=1e-6)
