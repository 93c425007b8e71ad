"""A term's model starts (``Term.model_defaults`` / ``Term.model_starts``): the model state a term needs starts where the term says.

``loss.terms: {siglip: 1.0}`` alone starts the logit scale at ln 10, open_clip's start for SigLIP
(``open_clip_train --siglip``: ``init_logit_scale=np.log(10)``), and creates the learnable bias at
the minimiser of SigLIP's row loss for the global batch at the initial angle θ = π/2, ``−log(B − 1)``
(the paper's −10 is that minimiser at B ≈ 22k); SphereFace2 likewise with its own row loss. One log
line; ``model.init_logit_bias`` and ``model.init_logit_scale`` override either. The minimisers are
checked against a bisection on the finite-difference slope of a loop-written row loss.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mmsphere.config import save_config
from mmsphere.errors import ConfigError
from mmsphere.train.config import config_from_dict, load_config
from mmsphere.losses import TERMS, Objective, Term, register_term
from mmsphere.models import factory
from mmsphere.models import create_model, load_run
from mmsphere.train import train
from tests.train.conftest import write_image_text_shards

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "configs" / "demo.yaml"
DATA = {"train": [{"urls": "unused.tar", "modality": "image"}]}
# open_clip_train/main.py, --siglip: model_kwargs init_logit_scale=np.log(10)
OPEN_CLIP_SIGLIP_LOG_SCALE = math.log(10.0)
BATCH = 32  # train.batch_size's default: the global batch the bias start is computed for
SIGLIP_BIAS = float(np.float32(-math.log(BATCH - 1)))  # what the model stores


def softplus(x: float) -> float:
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def row_loss(bias: float, batch: int, lam: float, positive: float, negative: float) -> float:
    """λ·softplus(−(p + b)) + (1 − λ)·Σ over the B − 1 negatives of softplus(n + b), one negative at a time."""
    total = lam * softplus(-(positive + bias))
    for _ in range(batch - 1):
        total += (1 - lam) * softplus(negative + bias)
    return total


def minimiser(batch: int, lam: float, positive: float, negative: float) -> float:
    """Bisection on the central-difference slope of :func:`row_loss` (convex in b)."""
    low, high = -60.0, 60.0
    for _ in range(100):
        middle = (low + high) / 2
        slope = (row_loss(middle + 1e-6, batch, lam, positive, negative)
                 - row_loss(middle - 1e-6, batch, lam, positive, negative))
        low, high = (middle, high) if slope < 0 else (low, middle)
    return (low + high) / 2


def _default_lines(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records
            if record.name == "mmsphere.train.config" and "starts for a global batch" in record.getMessage()]


def test_siglip_alone_starts_the_scale_where_open_clip_does_and_the_bias_at_its_minimiser(caplog):
    with caplog.at_level(logging.INFO, logger="mmsphere.train.config"):
        config = config_from_dict({"data": DATA, "loss": {"terms": {"siglip": 1.0}}})
    assert config.model.init_logit_bias == SIGLIP_BIAS
    assert config.model.init_logit_bias == pytest.approx(minimiser(BATCH, 0.5, 0.0, 0.0), abs=1e-5)
    assert config.model.init_logit_scale == pytest.approx(OPEN_CLIP_SIGLIP_LOG_SCALE, abs=1e-6)
    lines = _default_lines(caplog)
    assert len(lines) == 1, lines
    assert "loss.terms.siglip" in lines[0] and "global batch of 32" in lines[0]
    assert "model.init_logit_bias=-3.434" in lines[0] and "model.init_logit_scale=2.303" in lines[0]


@pytest.mark.parametrize("batch", [2, 8, 256, 4096])
@pytest.mark.parametrize("terms, model, row", [
    ({"siglip": 1.0}, {}, lambda s: (0.5, 0.0, 0.0)),
    ({"siglip": {"weight": 1.0, "margin": 0.2}}, {}, lambda s: (0.5, s * math.sin(0.2), 0.0)),
    ({"siglip": {"weight": 1.0, "margin": 0.2}}, {"init_logit_scale": 3.0}, lambda s: (0.5, s * math.sin(0.2), 0.0)),
    ({"sphereface2": 1.0}, {}, lambda s: (0.7, -0.1 * s, 0.1 * s)),
    ({"sphereface2": {"weight": 1.0, "variant": "A", "margin": 0.3, "lam": 0.6}}, {},
     lambda s: (0.6, s * math.cos(math.pi / 2 + 0.3), 0.0)),
    ({"sphereface2": {"weight": 1.0, "variant": "M", "margin": 1.5, "t": 2.0}}, {},
     lambda s: (0.7, s * (2 * ((1 + math.cos(1.5 * math.pi / 2)) / 2) ** 2 - 1), s * (2 * 0.5 ** 2 - 1))),
])
def test_the_bias_starts_at_the_row_loss_minimiser_for_the_global_batch(batch, terms, model, row):
    config = config_from_dict({"data": DATA, "model": model, "loss": {"terms": terms},
                               "train": {"batch_size": batch}})
    scale = math.exp(config.model.init_logit_scale if config.model.init_logit_scale is not None
                     else math.log(1 / 0.07))
    expected = minimiser(batch, *row(scale))
    assert config.model.init_logit_bias == pytest.approx(expected, abs=2e-5 * max(1.0, abs(expected)))


@pytest.mark.parametrize("model, bias, log_scale, logged", [
    ({"init_logit_bias": -3.0}, -3.0, OPEN_CLIP_SIGLIP_LOG_SCALE, ["model.init_logit_scale=2.303"]),
    ({"init_logit_scale": 1.5}, SIGLIP_BIAS, 1.5, ["model.init_logit_bias=-3.434"]),
    ({"init_logit_bias": -3.0, "init_logit_scale": 1.5}, -3.0, 1.5, []),
])
def test_an_explicit_setting_wins(caplog, model, bias, log_scale, logged):
    with caplog.at_level(logging.INFO, logger="mmsphere.train.config"):
        config = config_from_dict({"data": DATA, "model": {"name": "mmsphere-tiny", **model},
                                   "loss": {"terms": {"siglip": 1.0}}})
    assert (config.model.init_logit_bias, config.model.init_logit_scale) == (bias, pytest.approx(log_scale))
    lines = _default_lines(caplog)
    assert len(lines) == len(logged) and all(setting in line for setting, line in zip(logged, lines))
    assert not any(f"model.{key}" in line for line in lines for key in model)  # the config's own setting is not reported
    built = create_model(config.model)
    assert built.clip.logit_bias.item() == pytest.approx(bias)
    assert built.log_logit_scale.item() == pytest.approx(log_scale)


def test_terms_without_model_state_leave_the_model_alone(caplog):
    with caplog.at_level(logging.INFO, logger="mmsphere.train.config"):
        config = config_from_dict({"data": DATA, "model": {"name": "mmsphere-tiny"},
                                   "loss": {"terms": {"angular_margin": 1.0, "m2mix": 0.1}}})
    assert config.model.init_logit_bias is None and config.model.init_logit_scale is None
    assert _default_lines(caplog) == []
    built = create_model(config.model)
    assert getattr(built.clip, "logit_bias", None) is None
    assert built.log_logit_scale.item() == pytest.approx(math.log(1 / 0.07))  # open_clip's CLIP start


def test_the_written_config_records_the_starts(tmp_path, caplog):
    config = config_from_dict({"data": DATA, "loss": {"terms": {"siglip": 1.0}}})
    save_config(config, tmp_path / "config.yaml")
    with caplog.at_level(logging.INFO, logger="mmsphere.train.config"):
        again = load_config(tmp_path / "config.yaml")
    assert (again.model.init_logit_bias, again.model.init_logit_scale) == (SIGLIP_BIAS, pytest.approx(math.log(10)))
    assert _default_lines(caplog) == []  # set in the file: nothing left to default


@pytest.mark.parametrize("value, message", [
    (10.0, r"model.init_logit_scale=10.0 must be in \[0, ln 100"),
    (-1.0, r"model.init_logit_scale=-1.0 must be in \[0, ln 100"),
    (math.inf, "model.init_logit_scale=inf must be a finite number"),
])
def test_an_impossible_scale_start_is_a_config_error(value, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"data": DATA, "model": {"init_logit_scale": value}, "loss": {"terms": {"siglip": 1.0}}})


BUILTIN = [name for name in TERMS]


@pytest.mark.parametrize("name", BUILTIN)
def test_every_registered_term_works_with_its_defaults(name):
    """Contract over the registry: a term at its default weight, alone (or on the margin loss), builds, trains a step."""
    term = TERMS[name]
    terms = {name: term.default_weight} if term.contrastive else {"angular_margin": 1.0, name: term.default_weight}
    config = config_from_dict({"data": DATA, "model": {"name": "mmsphere-tiny"}, "loss": {"terms": terms}})
    for key, value in term.model_defaults.items():
        assert getattr(config.model, key) == pytest.approx(value)
    torch.manual_seed(0)
    model = create_model(config.model)
    if term.needs_logit_bias:
        assert model.clip.logit_bias.item() == config.model.init_logit_bias
    generator = torch.Generator().manual_seed(0)
    outputs = model(text=torch.randint(1, 400, (6, 16), generator=generator),
                    images=torch.randn(6, 3, 32, 32, generator=generator))
    output = Objective(config.loss)(**outputs, seed=0)
    output.loss.backward()
    assert torch.isfinite(output.loss)
    assert model.log_logit_scale.grad is not None and torch.isfinite(model.log_logit_scale.grad).all()


@pytest.fixture
def registered():
    """Names of the terms a test registers, removed from the registry afterwards."""
    names: list[str] = []
    yield names
    for name in names:
        TERMS.pop(name, None)


def _bias_term(name: str, defaults: dict[str, float]) -> type[Term]:
    """A user's term that reads the model's logit bias, with ``defaults`` as its model defaults."""

    def forward(self, context):
        return context.scaled_sum(context.positive_cosine) + 0 * context.logit_bias.sum()

    return type("BiasGap", (Term,), {"name": name, "needs_logit_bias": True, "model_defaults": defaults,
                                     "forward": forward})


def test_a_users_term_without_a_default_still_asks_for_the_setting(registered):
    registered.append("bias_gap_nodefault")
    register_term(_bias_term("bias_gap_nodefault", {}))
    terms = {"angular_margin": 1.0, "bias_gap_nodefault": 0.1}
    with pytest.raises(ConfigError, match="loss.terms.bias_gap_nodefault needs a learnable logit bias: set "
                                          "model.init_logit_bias"):
        config_from_dict({"data": DATA, "loss": {"terms": terms}})
    config = config_from_dict({"data": DATA, "model": {"init_logit_bias": -2.0}, "loss": {"terms": terms}})
    assert config.model.init_logit_bias == -2.0 and config.model.init_logit_scale is None


def test_terms_that_disagree_on_a_start_name_the_setting(registered):
    registered.append("bias_gap_minus_five")
    register_term(_bias_term("bias_gap_minus_five", {"init_logit_bias": -5.0}))
    terms = {"siglip": 1.0, "bias_gap_minus_five": 0.1}
    with pytest.raises(ConfigError, match=r"loss.terms.siglip starts model.init_logit_bias at -3.43\d*, "
                                          r"loss.terms.bias_gap_minus_five at -5: set model.init_logit_bias"):
        config_from_dict({"data": DATA, "loss": {"terms": terms}})
    config = config_from_dict({"data": DATA, "model": {"init_logit_bias": -7.0}, "loss": {"terms": terms}})
    assert config.model.init_logit_bias == -7.0


def test_a_default_for_something_that_is_not_a_model_start_cannot_register():
    with pytest.raises(TypeError, match=r"model_defaults: 'image_lr' is not a model config field that defaults "
                                        r"to null \(init_logit_bias, init_logit_scale\)"):
        register_term(_bias_term("bias_gap_bad_key", {"image_lr": 1e-3}))
    assert "bias_gap_bad_key" not in TERMS


def test_the_demo_config_trains_with_siglip_alone(tmp_path, monkeypatch, caplog):
    """configs/demo.yaml with ``loss.terms={siglip: 1.0}`` and nothing else about SigLIP: it trains, from b = −log(B − 1)."""
    shards = {"train": write_image_text_shards(tmp_path / "shards", "train", shards=2, per_shard=16, seed=0),
              "meta": write_image_text_shards(tmp_path / "shards", "meta", shards=1, per_shard=16, seed=1)}
    starts = []
    real_create = factory.create_model

    def recording_create(model_config, *args, **kwargs):
        model = real_create(model_config, *args, **kwargs)
        starts.append((model.clip.logit_bias.item(), model.log_logit_scale.item()))
        return model

    # mmsphere.train.loop.train builds its model with create_run_model, which calls factory.create_model
    monkeypatch.setattr(factory, "create_model", recording_create)
    overrides = ["loss.terms={siglip: 1.0}", f"output_dir={tmp_path / 'run'}",
                 f"data.train=[{{urls: '{shards['train']}', modality: image}}]",
                 f"data.meta={{urls: '{shards['meta']}', modality: image}}", "data.val=null", "data.workers=0",
                 "data.shuffle_buffer=16", "data.epoch_samples=32", "train.max_steps=2", "train.batch_size=8",
                 "train.warmup_steps=1", "train.checkpoint_every=2", "meta.weights_log_every=1"]
    with caplog.at_level(logging.INFO, logger="mmsphere.train.config"):
        config = load_config(DEMO, overrides)
    assert len(_default_lines(caplog)) == 1
    summary = train(config)
    assert summary["steps"] == 2 and summary["nonfinite_steps_skipped"] == 0
    start = float(np.float32(-math.log(8 - 1)))  # train.batch_size=8
    assert starts == [(start, pytest.approx(OPEN_CLIP_SIGLIP_LOG_SCALE))]
    trained = load_run(tmp_path / "run")
    # two Adam steps of lr ≤ 1e-3 move the bias by a few thousandths at most
    assert trained.clip.logit_bias.item() == pytest.approx(start, abs=0.01)
    assert trained.clip.logit_bias.item() != start  # and it is learned
