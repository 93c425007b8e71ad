"""The composed objective and the term registry.

The shared-matrix fast path of :class:`Objective` is compared with the sum of the plain functions
of ``mmsphere.losses.functional``, composed here by hand (ARCHITECTURE.md, Objective) with the documented random
draws (``default_rng(seed)``: the m²-mix λ, then one calibration p_i per sample).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as tf

from mmsphere.config import build_config
from mmsphere.errors import ConfigError
from mmsphere.losses.config import LossConfig
from mmsphere.losses import TERMS, Objective, ObjectiveOutput
from mmsphere.losses import functional as F

HALF = (torch.float16, torch.bfloat16)


def raw_pair(batch: int, dim: int, seed: int, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, dim, generator=generator, dtype=dtype).requires_grad_(),
            torch.randn(batch, dim, generator=generator, dtype=dtype).requires_grad_())


def weight(config: LossConfig, term: str) -> float:
    """The weight ``loss.terms`` gives ``term`` (0 when absent)."""
    entry = config.terms.get(term, 0.0)
    return entry.get("weight", TERMS[term].default_weight) if isinstance(entry, dict) else entry


def option(config: LossConfig, term: str, key: str):
    """A term's field as ``loss.terms`` sets it, else the default the term declares."""
    entry = config.terms.get(term)
    if isinstance(entry, dict) and key in entry:
        return entry[key]
    return getattr(TERMS[term].Options(), key)


def plain_composition(config: LossConfig, img, txt, scale, seed, weights=None, normalize="mean"):
    """The objective's composition (ARCHITECTURE.md, Objective) from the plain functions; returns (loss, terms, per_sample)."""
    rng = np.random.default_rng(seed)
    alpha = option(config, "m2mix", "alpha")
    lam = rng.beta(alpha, alpha) if weight(config, "m2mix") > 0 else None
    batch = img.shape[0]
    terms = {}
    if "angular_margin" in config.terms:
        per_sample = F.angular_margin_loss(img, txt, scale, option(config, "angular_margin", "margin"), reduction="none")
        name = "angular_margin"
    else:
        per_sample = F.clip_loss(img, txt, scale, reduction="none")
        name = "clip"
    weights = torch.ones(batch, dtype=per_sample.dtype) if weights is None else weights
    terms[name] = (weights * per_sample).sum() / (batch if normalize == "mean" else weights.sum())
    if lam is not None:
        terms["m2mix"] = F.m2mix_loss(img, txt, lam, option(config, "m2mix", "tau"))
    if weight(config, "calibrated_uniformity") > 0:
        calibration_option = lambda key: option(config, "calibrated_uniformity", key)  # noqa: E731
        p = torch.as_tensor(rng.beta(calibration_option("alpha"), calibration_option("alpha"), size=batch))
        with torch.set_grad_enabled(not calibration_option("detach_calibration")):
            fused = F.slerp(img, txt, p)
            calibration = (fused @ fused.T).clamp(calibration_option("min_sim"), calibration_option("max_sim"))
        terms["calibrated_uniformity"] = 0.5 * (F.calibrated_uniformity(img, calibration, calibration_option("t"))
                                                + F.calibrated_uniformity(txt, calibration, calibration_option("t")))
    if weight(config, "cma") > 0:
        terms["cma"] = F.cma_regularizer(img, txt, scale)
    loss = sum(weight(config, key) * value for key, value in terms.items())
    return loss, terms, per_sample


ALL_TERMS = {"angular_margin": 1.0, "m2mix": 0.5, "calibrated_uniformity": 0.3, "cma": 0.2}
CONFIGS = {
    "angular_margin": LossConfig(terms={"angular_margin": {"weight": 1.0, "margin": 0.3}}),
    "clip+m2mix": LossConfig(terms={"clip": 0.7, "m2mix": {"weight": 1.0, "alpha": 2.0, "tau": 0.2}}),
    "clip+calibrated_uniformity": LossConfig(terms={"clip": 1.0, "calibrated_uniformity": {
        "weight": 1.0, "t": 3.0, "min_sim": 0.1, "max_sim": 0.6}}),
    "calibration_with_grad": LossConfig(terms={"clip": 1.0, "calibrated_uniformity": {
        "weight": 1.0, "detach_calibration": False}}),
    # t = 15 spreads the exponents beyond fp32's exp range: the log-sum-exp shift comes from the data
    "calibrated_uniformity, large t": LossConfig(terms={"clip": 1.0, "calibrated_uniformity": {"weight": 1.0, "t": 15.0}}),
    "angular_margin+cma": LossConfig(terms={"angular_margin": 1.0, "cma": 0.5}),
    "all terms": LossConfig(terms=dict(ALL_TERMS)),
    "all terms, zero-weight m2mix": LossConfig(terms={**ALL_TERMS, "m2mix": 0.0}),
}


# every config unweighted, the sample-weight variants on the two contrastive terms' richest configs
COMBINATIONS = [(name, None) for name in CONFIGS] + [
    (name, weighting) for name in ("all terms", "clip+m2mix") for weighting in ("mean", "sum", "callable")]


@pytest.mark.parametrize(("name", "weighting"), COMBINATIONS)
def test_fast_path_equals_sum_of_plain_functions(name, weighting):
    config = CONFIGS[name]
    raw_image, raw_text = raw_pair(9, 5, seed=1)
    scale = torch.tensor(6.0, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(9, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    normalize = "sum" if weighting == "sum" else "mean"
    sample_weights = {None: None, "mean": weights, "sum": weights, "callable": lambda losses: losses / losses.sum()}
    # features through L2 normalisation, as every encoder produces them: gradients are compared w.r.t.
    # the raw rows (the fast path drops the radial gradient component that normalisation removes)
    image, text = tf.normalize(raw_image, dim=1), tf.normalize(raw_text, dim=1)
    output = Objective(config)(image, text, scale, sample_weights=sample_weights[weighting],
                               weight_normalize=normalize, seed=5)
    expected_weights = None if weighting is None else weights
    if weighting == "callable":
        per_sample = F.angular_margin_loss(image, text, scale, option(config, "angular_margin", "margin"), reduction="none") \
            if "angular_margin" in config.terms else F.clip_loss(image, text, scale, reduction="none")
        expected_weights = per_sample.detach() / per_sample.detach().sum()
    loss, terms, per_sample = plain_composition(config, image, text, scale, 5, expected_weights, normalize)

    active = [key for key in config.terms if weight(config, key) > 0 or key in ("clip", "angular_margin")]
    assert list(output.terms) == active + ["total"]
    for key, value in terms.items():
        torch.testing.assert_close(output.terms[key], value.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(output.terms["total"], loss.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(output.loss, loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(output.per_sample, per_sample, rtol=1e-10, atol=1e-12)
    actual_gradients = torch.autograd.grad(output.loss, [raw_image, raw_text, scale], retain_graph=True)
    expected_gradients = torch.autograd.grad(loss, [raw_image, raw_text, scale], retain_graph=True)
    for actual, expected in zip(actual_gradients, expected_gradients):
        torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-11)
    per_sample_gradient = torch.autograd.grad(output.per_sample.sum(), raw_image, retain_graph=True)[0]
    torch.testing.assert_close(per_sample_gradient, torch.autograd.grad(per_sample.sum(), raw_image)[0])


def test_second_order_gradients_pass_through_the_fast_path():
    """The meta step differentiates a gradient of the objective; check it against finite differences."""
    # a detached calibration is a stop-gradient that finite differences would see through
    objective = Objective(LossConfig(terms={**ALL_TERMS, "calibrated_uniformity": {"weight": 0.3, "detach_calibration": False}}))
    raw_image, raw_text = raw_pair(4, 3, seed=3)

    def loss(image, text):
        return objective(tf.normalize(image, dim=1), tf.normalize(text, dim=1), 3.0, seed=0).loss

    assert torch.autograd.gradgradcheck(loss, (raw_image, raw_text), fast_mode=True)


def test_sample_weights_of_one_change_nothing():
    image, text = (tf.normalize(x, dim=1) for x in raw_pair(6, 4, seed=4))
    objective = Objective(LossConfig(terms=dict(ALL_TERMS)))
    plain = objective(image, text, 5.0, seed=2)
    for normalize in ("mean", "sum"):
        weighted = objective(image, text, 5.0, sample_weights=torch.ones(6, dtype=image.dtype),
                             weight_normalize=normalize, seed=2)
        torch.testing.assert_close(weighted.loss, plain.loss)


def test_zero_weights_give_a_finite_zero_contrastive_term():
    image, text = (tf.normalize(x, dim=1) for x in raw_pair(6, 4, seed=5))
    zeros = torch.zeros(6, dtype=image.dtype)
    output = Objective(LossConfig(terms={"clip": 1.0}))(image, text, 5.0, sample_weights=zeros, weight_normalize="sum")
    assert output.loss.item() == 0.0
    output.loss.backward()


def test_draws_follow_the_seed():
    image, text = (tf.normalize(x, dim=1) for x in raw_pair(8, 4, seed=6))
    objective = Objective(LossConfig(terms=dict(ALL_TERMS)))
    first, again, other = (objective(image, text, 5.0, seed=seed).terms for seed in (1, 1, 2))
    assert first["m2mix"] == again["m2mix"] and first["calibrated_uniformity"] == again["calibrated_uniformity"]
    assert first["m2mix"] != other["m2mix"] and first["calibrated_uniformity"] != other["calibrated_uniformity"]


def test_output_shape_and_detached_terms():
    image, text = (tf.normalize(x, dim=1) for x in raw_pair(5, 4, seed=7))
    output = Objective(LossConfig(terms=dict(ALL_TERMS)))(image, text, 5.0, seed=0)
    assert isinstance(output, ObjectiveOutput)
    assert output.loss.shape == () and output.loss.requires_grad
    assert output.per_sample.shape == (5,) and output.per_sample.requires_grad
    assert all(not value.requires_grad for value in output.terms.values())
    assert output.terms["total"] == output.loss.detach()


def test_autocast_region_does_not_lower_precision():
    image, text = (tf.normalize(x.float(), dim=1) for x in raw_pair(8, 16, seed=8))
    objective = Objective(LossConfig(terms=dict(ALL_TERMS)))
    expected = objective(image, text, 50.0, seed=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        actual = objective(image, text, 50.0, seed=0)
    assert actual.loss.dtype == torch.float32
    torch.testing.assert_close(actual.loss, expected.loss)


# --------------------------------------------------------------------------------------------
# the registry: one contract test over every registered term


def _calibrated_uniformity_reference(img, txt, scale, bias, options, draw, reduction):
    with torch.set_grad_enabled(torch.is_grad_enabled() and not options.detach_calibration):
        fused = F.slerp(img, txt, torch.as_tensor(draw, dtype=img.dtype))
        calibration = (fused @ fused.T).clamp(options.min_sim, options.max_sim)
    return 0.5 * (F.calibrated_uniformity(img, calibration, options.t) + F.calibrated_uniformity(txt, calibration, options.t))


# each built-in term as its function in mmsphere.losses.functional (the term on one whole batch in one process;
# test_functional.py checks those against float64 loop transcriptions and finite differences), so these tests
# check the objective's composition: gathering, rows, draws, reduction; adding a term to the registry means
# adding its reference here, or the contract test fails
REFERENCES = {
    "clip": lambda img, txt, s, b, options, draw, reduction, **kw: F.clip_loss(img, txt, s, reduction, **kw),
    "angular_margin": lambda img, txt, s, b, options, draw, reduction, **kw: F.angular_margin_loss(
        img, txt, s, options.margin, reduction, **kw),
    "siglip": lambda img, txt, s, b, options, draw, reduction, **kw: F.siglip_loss(
        img, txt, s, b, options.margin, reduction, **kw),
    "m2mix": lambda img, txt, s, b, options, draw, reduction: F.m2mix_loss(img, txt, draw, options.tau, reduction),
    "calibrated_uniformity": _calibrated_uniformity_reference,
    "cma": lambda img, txt, s, b, options, draw, reduction: F.cma_regularizer(img, txt, s, reduction),
}
BUILT_IN = [name for name, term in TERMS.items() if term.__module__ == "mmsphere.losses.terms"]
OPTIONS = {"angular_margin": {"margin": 0.3}, "siglip": {"margin": 0.2}, "m2mix": {"alpha": 2.0, "tau": 0.2},
           "calibrated_uniformity": {"t": 3.0, "min_sim": 0.1, "max_sim": 0.6}}


def _term_config(name: str) -> LossConfig:
    term = {"weight": 1.0, **OPTIONS.get(name, {})}
    return LossConfig(terms={name: term} if TERMS[name].contrastive else {"clip": 1.0, name: term})


def _reference_value(name, image, text, scale, bias, seed, reduction="mean", **extras):
    objective = Objective(_term_config(name))
    term = objective.terms[name]
    # the objective's draws with this seed: every active term in registry order
    rng = np.random.default_rng(seed)
    draws = {key: active.draw(rng, image.shape[0]) for key, active in objective.terms.items()}
    return REFERENCES[name](image, text, scale, bias, term.options, draws[name], reduction, **extras)


def test_every_built_in_term_has_a_plain_reference():
    assert set(BUILT_IN) == set(REFERENCES)
    assert {name for name in BUILT_IN if TERMS[name].contrastive} == {"clip", "angular_margin", "siglip"}


@pytest.mark.parametrize("name", BUILT_IN)
def test_every_registered_term_equals_its_reference_in_float64(name):
    raw_image, raw_text = raw_pair(9, 5, seed=12)
    image, text = tf.normalize(raw_image, dim=1), tf.normalize(raw_text, dim=1)
    scale = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
    output = Objective(_term_config(name))(image, text, scale, logit_bias=bias, seed=3)
    expected = _reference_value(name, image, text, scale, bias, seed=3)
    torch.testing.assert_close(output.terms[name], expected.detach(), rtol=1e-10, atol=1e-12)
    leaves = [raw_image, raw_text, scale] + ([bias] if TERMS[name].needs_logit_bias else [])
    if TERMS[name].contrastive:
        per_sample = _reference_value(name, image, text, scale, bias, seed=3, reduction="none")
        torch.testing.assert_close(output.per_sample, per_sample, rtol=1e-10, atol=1e-12)
        reference_loss = expected
    else:
        reference_loss = F.clip_loss(image, text, scale) + expected
    actual = torch.autograd.grad(output.loss, leaves, retain_graph=True)
    reference = torch.autograd.grad(reference_loss, leaves)
    for got, want in zip(actual, reference):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, *HALF], ids=str)
@pytest.mark.parametrize("name", BUILT_IN)
def test_every_registered_term_honours_the_contract(name, dtype):
    term = TERMS[name]
    assert term.name == name and term.default_weight > 0 and term.description
    raw_image, raw_text = raw_pair(8, 16, seed=9, dtype=torch.float32)
    image, text = (tf.normalize(x, dim=1).to(dtype) for x in (raw_image, raw_text))
    scale = torch.tensor(20.0, requires_grad=True)
    compute = torch.promote_types(dtype, torch.float32)
    output = Objective(_term_config(name))(image, text, scale, logit_bias=-5.0, seed=0)
    assert name in output.terms and torch.isfinite(output.loss) and output.loss.dtype == compute
    assert output.per_sample.shape == (8,)
    output.loss.backward()
    assert torch.isfinite(raw_image.grad).all() and torch.isfinite(raw_text.grad).all()
    expected = _reference_value(name, image.float(), text.float(), scale.detach(), -5.0, seed=0)
    tolerance = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(output.terms[name], expected.detach(), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("name", BUILT_IN)
def test_identical_pairs_keep_gradients_finite(name):
    raw = raw_pair(6, 4, seed=13, dtype=torch.float32)[0]
    features = tf.normalize(raw, dim=1)
    output = Objective(_term_config(name))(features, features, 30.0, logit_bias=-5.0, seed=0)
    output.loss.backward()
    assert torch.isfinite(output.loss) and torch.isfinite(raw.grad).all()


@pytest.mark.parametrize("name", ["clip", "angular_margin", "siglip"])
def test_group_positives_equal_the_functional_definition(name):
    raw_image, raw_text = raw_pair(8, 5, seed=14)
    image, text = tf.normalize(raw_image, dim=1), tf.normalize(raw_text, dim=1)
    groups = torch.tensor([0, 1, 0, 2, 1, 3, 0, 4])
    output = Objective(_term_config(name))(image, text, 6.0, logit_bias=-1.0, group_ids=groups, seed=0)
    expected = _reference_value(name, image, text, 6.0, -1.0, seed=0, reduction="none", group_ids=groups)
    torch.testing.assert_close(output.per_sample, expected, rtol=1e-10, atol=1e-12)
    distinct = Objective(_term_config(name))(image, text, 6.0, logit_bias=-1.0, group_ids=torch.arange(8) * 3, seed=0)
    single = Objective(_term_config(name))(image, text, 6.0, logit_bias=-1.0, seed=0)
    torch.testing.assert_close(distinct.per_sample, single.per_sample, rtol=1e-12, atol=1e-12)


def test_siglip_objective_equals_open_clip_siglip_loss():
    import open_clip

    image, text = (tf.normalize(x.detach(), dim=1) for x in raw_pair(12, 6, seed=15))
    output = Objective(LossConfig(terms={"siglip": {"weight": 1.0, "margin": 0.0}}))(image, text, 10.0, logit_bias=-10.0)
    expected = open_clip.loss.SigLipLoss()(image, text, torch.tensor(10.0, dtype=torch.float64),
                                           torch.tensor(-10.0, dtype=torch.float64))
    torch.testing.assert_close(output.loss, expected, rtol=1e-10, atol=1e-12)


def test_each_matrix_is_built_once_per_call(monkeypatch):
    from mmsphere.losses import terms as terms_module

    built = []
    original = terms_module.TermContext.__dict__["logits"].func

    def counting(self):
        built.append(1)
        return original(self)

    monkeypatch.setattr(terms_module.TermContext, "logits", terms_module.cached_property(counting))
    terms_module.TermContext.logits.__set_name__(terms_module.TermContext, "logits")
    image, text = (tf.normalize(x.detach(), dim=1) for x in raw_pair(6, 4, seed=16))
    Objective(LossConfig(terms=dict(ALL_TERMS)))(image, text, 5.0, seed=0)
    assert len(built) == 1  # four terms read it


def test_older_flat_and_per_term_forms_are_the_same_objective():
    image, text = (tf.normalize(x.detach(), dim=1) for x in raw_pair(6, 4, seed=17))
    short = Objective(build_config(LossConfig, {"terms": {"angular_margin": 1.0, "m2mix": 0.5}, "margin": 0.3,
                                                "tau_mix": 0.2}, "loss."))
    per_term = Objective(LossConfig(terms={"angular_margin": {"weight": 1.0, "margin": 0.3},
                                           "m2mix": {"weight": 0.5, "tau": 0.2}}))
    torch.testing.assert_close(short(image, text, 5.0, seed=1).loss, per_term(image, text, 5.0, seed=1).loss,
                               rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"terms": {"angular_margn": 1.0}}, r"unknown term 'angular_margn'; did you mean 'angular_margin'\?"),
        ({"terms": {"m2mix": 1.0}}, r"loss.terms must hold exactly one contrastive term .*got none"),
        ({"terms": {"clip": 1.0, "angular_margin": 1.0}}, r"exactly one contrastive term .*\['clip', 'angular_margin'\]"),
        ({"terms": {"clip": 1.0, "cma": -1.0}}, r"loss.terms.cma.weight=-1.0 must be a finite number >= 0"),
        ({"terms": {"clip": 1.0, "cma": math.inf}}, r"loss.terms.cma.weight=inf must be a finite number >= 0"),
        ({"terms": {"angular_margin": {"weight": 1.0, "margn": 0.2}}},
         r"loss.terms.angular_margin: unknown field 'margn'; did you mean 'margin'\?"),
        ({"terms": {"angular_margin": {"margin": "wide"}}}, r"loss.terms.angular_margin.margin='wide' must be of type"),
        ({"terms": {"angular_margin": {"margin": 4.0}}}, r"loss.terms.angular_margin.margin=4.0 must be in \[0, π\)"),
        ({"terms": {"clip": 1.0, "m2mix": {"tau": 0.0}}}, r"loss.terms.m2mix.tau=0.0 must be > 0"),
        ({"terms": {"clip": 1.0, "calibrated_uniformity": {"min_sim": 0.9, "max_sim": 0.1}}},
         r"loss.terms.calibrated_uniformity.min_sim=0.9, max_sim=0.1 must satisfy"),
        ({"local_loss": True, "gather_with_grad": False}, r"loss.local_loss=true needs loss.gather_with_grad=true"),
    ],
)
def test_bad_config_raises_config_error(changes, message):
    with pytest.raises(ConfigError, match=message):
        Objective(dataclasses.replace(LossConfig(), **changes))


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"margin": 4.0}, r"loss.terms.angular_margin.margin=4.0 must be in \[0, π\)"),
        ({"terms": {"clip": 1.0, "m2mix": 0.1}, "tau_mix": 0.0}, r"loss.terms.m2mix.tau=0.0 must be > 0"),
        ({"terms": {"clip": 1.0, "calibrated_uniformity": 0.1}, "min_sim": 0.9, "max_sim": 0.1},
         r"loss.terms.calibrated_uniformity.min_sim=0.9, max_sim=0.1 must satisfy"),
    ],
)
def test_bad_older_flat_values_are_reported_at_the_field_they_became(raw, message):
    with pytest.raises(ConfigError, match=message):
        build_config(LossConfig, raw, "loss.")


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda o, x, y: o(x, y[:5], 5.0),
         r"image_features and text_features must have the same shape .*\[6, 4\] and \[5, 4\]"),
        (lambda o, x, y: o(x, y[:, :3], 5.0), r"same shape .*\[6, 4\] and \[6, 3\]"),
        (lambda o, x, y: o(x[0], y[0], 5.0), r"image_features must be a 2-D float tensor \[n, D\], got \[4\]"),
        (lambda o, x, y: o(x[:1], y[:1], 5.0), r"image_features must hold at least 2 samples .*\[1, 4\]"),
        (lambda o, x, y: o(x[:0], y[:0], 5.0), r"at least 2 samples .*\[0, 4\]"),
        (lambda o, x, y: o(x.long(), y, 5.0), r"image_features must be a 2-D float tensor"),
        (lambda o, x, y: o(3 * x, y, 5.0), r"image_features must hold L2-normalised rows: max \|‖row‖ − 1\| = 2"),
        (lambda o, x, y: o(x, y, torch.ones(3)),
         r"logit_scale must be a float or a one-element tensor, got shape \[3\]"),
        (lambda o, x, y: o(x, y, 0.0), r"logit_scale=0.0 must be > 0"),
        (lambda o, x, y: o(x, y, torch.tensor(-2.0)), r"logit_scale=-2 must be > 0"),
        (lambda o, x, y: o(x, y, 5.0, sample_weights=torch.ones(5)),
         r"sample_weights must be a tensor of shape \[n\] = \[6\]"),
        (lambda o, x, y: o(x, y, 5.0, sample_weights=-torch.ones(6)),
         r"sample_weights must be >= 0, got a minimum of -1"),
        (lambda o, x, y: o(x, y, 5.0, sample_weights=lambda losses: losses[:2]),
         r"sample_weights returned shape \[2\], expected \[n\] = \[6\]"),
        (lambda o, x, y: o(x, y, 5.0, group_ids=torch.zeros(5, dtype=torch.long)),
         r"group_ids must be an integer tensor of shape \[n\] = \[6\], got \[5\]"),
        (lambda o, x, y: o(x, y, 5.0, weight_normalize="max"), r"weight_normalize='max' must be 'mean' or 'sum'"),
        (lambda o, x, y: o(x, y, 5.0, seed=1.5), r"seed=1.5 must be an integer or None"),
    ],
)
def test_bad_input_raises_a_clear_value_error(call, message):
    image, text = (tf.normalize(x.detach(), dim=1) for x in raw_pair(6, 4, seed=10, dtype=torch.float32))
    with pytest.raises(ValueError, match=message):
        call(Objective(LossConfig(terms=dict(ALL_TERMS))), image, text)


def test_non_finite_features_give_a_non_finite_loss_not_an_error():
    image, text = (tf.normalize(x.detach(), dim=1) for x in raw_pair(6, 4, seed=11))
    image[2] = math.nan
    output = Objective(LossConfig(terms=dict(ALL_TERMS)))(image, text, 5.0, seed=0)
    assert not torch.isfinite(output.loss)
