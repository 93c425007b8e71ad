"""One optimisation step: the clamps of the logit scale and bias that follow every real update."""

from __future__ import annotations

import math

import pytest
import torch

from mmsphere.config import config_from_dict
from mmsphere.losses import Objective
from mmsphere.models import create_model
from mmsphere.train.loop import build_accelerator
from mmsphere.train.optim import build_optimizer, cosine_schedule
from mmsphere.train.step import optimization_step

# the documented ranges, written out rather than imported: log s in [0, ln 100] (DESIGN §1), and the
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
    inputs = {"text": torch.randint(1, 400, (8, 16), generator=generator),
              "images": torch.randn(8, 3, 32, 32, generator=generator)}
    before = {name: parameter.detach().clone() for name, parameter in network.named_parameters()}
    outcome = optimization_step(model, network, Objective(config.loss), optimizer, scheduler, accelerator, config,
                                inputs, seed=0)
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
