"""The margin family of face recognition as cross-modal terms (mmsphere.losses.margins).

Every function is compared with the loop-based float64 transcription in ``margin_reference`` (values
and gradients, with and without group ids, per-sample and mean), every term with its function
(global rows and the rows of one rank in ``local_loss`` mode), and the reductions to ``clip_loss``,
``siglip_loss`` and ``angular_margin_loss`` are checked, as are characteristic gradient detachment,
identical and antipodal pairs in fp32/bf16, Cam-Softmax's schedule and SphereFace2's bias start.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as tf

from mmsphere.losses import TERMS, TermContext
from mmsphere.losses import functional as F
from mmsphere.losses import margins as M
from mmsphere.losses.terms import Rows
from tests.losses import margin_reference as R

GROUPS = torch.tensor([0, 1, 0, 2, 1, 3])
SCALE = 6.0
BIAS = -1.5


def features(batch: int = 6, dim: int = 5, seed: int = 0, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    raw = torch.randn(2, batch, dim, generator=generator, dtype=torch.float64)
    image, text = tf.normalize(raw[0], dim=1), tf.normalize(raw[1], dim=1)
    return image.to(dtype), text.to(dtype)


def raw_norms(batch: int = 6, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return tuple(3 + 10 * torch.rand(batch, generator=generator, dtype=torch.float64) for _ in range(2))


# name -> (term name, options, function(img, txt, scale, groups, reduction, norms), reference(img, txt, scale,
# groups, norms)); the reference returns per-sample values
def _case(term, options, function, reference):
    return term, options, function, reference


CASES = {}
for detach in (False, True):
    tag = "-detach" if detach else ""
    CASES[f"cosface{tag}"] = _case(
        "cosface", {"margin": 0.25, "detach": detach},
        lambda i, t, s, g, red, n, d=detach: M.cosface_loss(i, t, s, 0.25, g, red, d),
        lambda i, t, s, g, n, d=detach: R.cosface(i, t, s, 0.25, g, d))
    for fallback in ("insightface", "clamp"):
        # m = 2: θ + m > π for every cosine below cos(π − 2) ≈ 0.42, so the fallback is exercised
        CASES[f"arcface-{fallback}{tag}"] = _case(
            "arcface", {"margin": 2.0, "fallback": fallback, "detach": detach},
            lambda i, t, s, g, red, n, d=detach, f=fallback: M.arcface_loss(i, t, s, 2.0, f, g, red, d),
            lambda i, t, s, g, n, d=detach, f=fallback: R.arcface(i, t, s, 2.0, f, g, d))
    CASES[f"arcface-0.3{tag}"] = _case(
        "arcface", {"margin": 0.3, "detach": detach},
        lambda i, t, s, g, red, n, d=detach: M.arcface_loss(i, t, s, 0.3, "insightface", g, red, d),
        lambda i, t, s, g, n, d=detach: R.arcface(i, t, s, 0.3, "insightface", g, d))
    for version in ("v0", "v1", "v2"):
        # m = 2.7: mθ crosses π and 2π (v0's k up to 2)
        CASES[f"sphereface_r-{version}{tag}"] = _case(
            "sphereface_r", {"margin": 2.7, "version": version, "detach": detach},
            lambda i, t, s, g, red, n, d=detach, v=version: M.sphereface_r_loss(i, t, s, 2.7, v, "hard", g, red, d),
            lambda i, t, s, g, n, d=detach, v=version: R.sphereface_r(i, t, s, 2.7, v, "hard", g, d))
    for normalization in ("none", "soft"):
        CASES[f"sphereface_r-v1-{normalization}{tag}"] = _case(
            "sphereface_r", {"margin": 1.5, "version": "v1", "normalization": normalization, "detach": detach,
                             "norm_weight": 0.3, "norm_target": 8.0},
            lambda i, t, s, g, red, n, d=detach, z=normalization: M.sphereface_r_loss(
                i, t, s, 1.5, "v1", z, g, red, d, norms=n, norm_weight=0.3, norm_target=8.0),
            lambda i, t, s, g, n, d=detach, z=normalization: R.sphereface_r(
                i, t, s, 1.5, "v1", z, g, d, norms=n, norm_weight=0.3, norm_target=8.0))
    for c in (1.2, 1.9):  # p > 1 and p < 1
        CASES[f"cam_softmax-{c}{tag}"] = _case(
            "cam_softmax", {"c_start": c, "c_stop": c, "c_decay": 0.0, "detach": detach},
            lambda i, t, s, g, red, n, d=detach, c=c: M.cam_softmax_loss(i, t, s, c, g, red, d),
            lambda i, t, s, g, n, d=detach, c=c: R.cam_softmax(i, t, s, c, g, d))
    for variant, margin in (("C", 0.3), ("A", 0.4), ("M", 1.6)):
        for t in (1.0, 3.0):
            CASES[f"sphereface2-{variant}-t{t:g}{tag}"] = _case(
                "sphereface2", {"lam": 0.7, "margin": margin, "t": t, "variant": variant, "detach": detach},
                lambda i, x, s, g, red, n, d=detach, v=variant, m=margin, t=t: M.sphereface2_loss(
                    i, x, s, BIAS, 0.7, m, t, v, g, red, d),
                lambda i, x, s, g, n, d=detach, v=variant, m=margin, t=t: R.sphereface2(
                    i, x, s, BIAS, 0.7, m, t, v, g, d))
for inter in ("sum", "mean"):
    for a, b in ((1.0, 1.5), (0.8, 1.23)):
        CASES[f"sface-{inter}-{a}-{b}"] = _case(
            "sface", {"scale": SCALE, "k": 20.0, "a": a, "b": b, "inter_reduction": inter},
            lambda i, t, s, g, red, n, a=a, b=b, r=inter: M.sface_loss(i, t, s, 20.0, a, b, r, g, red),
            lambda i, t, s, g, n, a=a, b=b, r=inter: R.sface(i, t, s, 20.0, a, b, r, g))


def _reads_norms(name: str) -> bool:
    return name.startswith("sphereface_r-v1-none") or name.startswith("sphereface_r-v1-soft")


def _leaves(seed: int = 0):
    image, text = features(seed=seed)
    image, text = image.clone().requires_grad_(), text.clone().requires_grad_()
    norms = tuple(n.clone().requires_grad_() for n in raw_norms())
    return image, text, norms


# --------------------------------------------------------------------------------------------
# each function against its loop transcription


@pytest.mark.parametrize("groups", [None, GROUPS], ids=["single", "groups"])
@pytest.mark.parametrize("name", list(CASES))
def test_function_equals_its_loop_transcription(name, groups):
    _, _, function, reference = CASES[name]
    image, text, norms = _leaves()
    # a learnable s, so its gradient is compared too (SFace takes its fixed scale the same way)
    scale = torch.tensor(SCALE, dtype=torch.float64, requires_grad=True)
    expected = reference(image, text, scale, groups, norms)
    per_sample = function(image, text, scale, groups, "none", norms)
    torch.testing.assert_close(per_sample, expected, rtol=1e-10, atol=1e-12)
    mean = function(image, text, scale, groups, "mean", norms)
    torch.testing.assert_close(mean, expected.mean(), rtol=1e-10, atol=1e-12)
    leaves = [image, text, scale] + (list(norms) if _reads_norms(name) else [])
    got = torch.autograd.grad(mean, leaves, allow_unused=True, materialize_grads=True)
    want = torch.autograd.grad(expected.mean(), leaves, allow_unused=True, materialize_grads=True)
    for actual, wanted in zip(got, want):
        torch.testing.assert_close(actual, wanted, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("name", [name for name in CASES if CASES[name][0] is not None])
def test_all_distinct_group_ids_equal_the_single_positive_form(name):
    _, _, function, _ = CASES[name]
    image, text = features(seed=2)
    norms = raw_norms() if _reads_norms(name) else None
    single = function(image, text, SCALE, None, "none", norms)
    distinct = function(image, text, SCALE, torch.arange(6) * 7, "none", norms)
    torch.testing.assert_close(distinct, single, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# the term is the function: global rows and one rank's rows in local_loss mode


def _context(image, text, groups, scale=SCALE, bias=BIAS, rank=None, sizes=(2, 2, 2), norms=None) -> TermContext:
    scale, bias = torch.tensor(scale, dtype=image.dtype), torch.tensor(bias, dtype=image.dtype)
    if rank is None:
        rows = Rows(image, text, image, text, 0, [image.shape[0]], 0, True)
    else:
        offset = sum(sizes[:rank])
        local = slice(offset, offset + sizes[rank])
        rows = Rows(image[local], text[local], image, text, offset, list(sizes), rank, False)
    image_norms, text_norms = norms if norms is not None else (None, None)
    # as the objective passes them: the whole batch's norms [N], the term takes its rows' share
    return TermContext(rows, scale, image.dtype, {}, bias, groups, image_norms=image_norms, text_norms=text_norms)


@pytest.mark.parametrize("groups", [None, GROUPS], ids=["single", "groups"])
@pytest.mark.parametrize("name", [name for name in CASES if CASES[name][0] is not None])
def test_term_equals_its_function_in_global_and_local_mode(name, groups):
    term_name, options, function, _ = CASES[name]
    term = TERMS[term_name](TERMS[term_name].Options(**options))
    image, text = features(seed=3)
    norms = raw_norms() if _reads_norms(name) else None
    assert term.needs_feature_norms == _reads_norms(name)
    expected = function(image, text, SCALE, groups, "none", norms)
    torch.testing.assert_close(term.forward(_context(image, text, groups, norms=norms)), expected,
                               rtol=1e-12, atol=1e-12)
    for rank in range(3):
        local = term.forward(_context(image, text, groups, rank=rank, norms=norms))
        torch.testing.assert_close(local, expected[2 * rank:2 * rank + 2], rtol=1e-12, atol=1e-12)


def test_the_six_terms_are_registered_contrastive_terms_with_valid_defaults():
    names = ["cosface", "arcface", "sphereface_r", "cam_softmax", "sface", "sphereface2"]
    for name in names:
        term = TERMS[name]
        assert term.contrastive and term.description and term.Options().check() == []
    assert TERMS["sphereface2"].needs_logit_bias
    options = TERMS["sphereface2"].Options()
    assert TERMS["sphereface2"].model_starts(options, batch_size=256, logit_scale=1 / 0.07) == {
        "init_logit_bias": pytest.approx(M.sphereface2_bias_init(256, 0.7, 1.0, 0.1, 1 / 0.07), abs=1e-12)}
    assert TERMS["sphereface_r"].Options(normalization="soft").check() == []


def test_sface_never_trains_the_logit_scale():
    image, text = features(seed=4)
    scale = torch.tensor(SCALE, dtype=torch.float64, requires_grad=True)
    term = TERMS["sface"](TERMS["sface"].Options())
    value = term.forward(_context(image, text, None, scale=SCALE)).mean()
    context = _context(image, text, None)
    context.scale = scale
    (gradient,) = torch.autograd.grad(term.forward(context).mean(), scale)
    assert gradient == 0 and torch.isfinite(value)


def test_cam_softmax_term_follows_the_step_it_is_given():
    options = {"c_start": math.pi / 2, "c_stop": 1.0, "c_decay": 1e-3}
    term = TERMS["cam_softmax"](TERMS["cam_softmax"].Options(**options))
    image, text = features(seed=5)
    for step in (0, 250, 10_000):
        context = _context(image, text, None)
        context.step = step  # what the objective will pass
        c = M.cam_softmax_c(step, options["c_start"], options["c_stop"], options["c_decay"])
        torch.testing.assert_close(term.forward(context), M.cam_softmax_loss(image, text, SCALE, c, reduction="none"))
    # no step passed: the schedule's start
    torch.testing.assert_close(term.forward(_context(image, text, None)),
                               F.clip_loss(image, text, SCALE, reduction="none"), rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------
# the reductions


@pytest.mark.parametrize("groups", [None, GROUPS], ids=["single", "groups"])
def test_reductions_to_clip(groups):
    image, text = features(seed=6)
    clip = F.clip_loss(image, text, SCALE, reduction="none", group_ids=groups)
    reduced = {
        "cosface m=0": M.cosface_loss(image, text, SCALE, 0.0, groups, "none"),
        "arcface m=0": M.arcface_loss(image, text, SCALE, 0.0, group_ids=groups, reduction="none"),
        "cam_softmax c=π/2": M.cam_softmax_loss(image, text, SCALE, math.pi / 2, groups, "none"),
        **{f"sphereface_r {version} m=1": M.sphereface_r_loss(image, text, SCALE, 1.0, version, group_ids=groups,
                                                              reduction="none", detach=detach)
           for version in ("v0", "v1", "v2") for detach in (False, True)},
    }
    for name, value in reduced.items():
        torch.testing.assert_close(value, clip, rtol=1e-9, atol=1e-10, msg=name)


@pytest.mark.parametrize("groups", [None, GROUPS], ids=["single", "groups"])
def test_sphereface2_reduces_to_siglip_over_2r(groups):
    image, text = features(seed=7)
    for reduction in ("none", "mean"):
        siglip = F.siglip_loss(image, text, SCALE, BIAS, 0.0, reduction, group_ids=groups)
        for detach in (False, True):
            value = M.sphereface2_loss(image, text, SCALE, BIAS, 0.5, 0.0, 1.0, "C", groups, reduction, detach)
            torch.testing.assert_close(value, siglip / (2 * SCALE), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("groups", [None, GROUPS], ids=["single", "groups"])
def test_arcface_with_negative_margin_is_the_angular_margin(groups):
    image, text = features(seed=8)
    for margin in (0.1, 0.5, 2.0):
        expected = F.angular_margin_loss(image, text, SCALE, margin, reduction="none", group_ids=groups)
        got = M.arcface_loss(image, text, SCALE, -margin, group_ids=groups, reduction="none")
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# characteristic gradient detachment


@pytest.mark.parametrize("groups", [None, GROUPS], ids=["single", "groups"])
@pytest.mark.parametrize("name", [name for name in CASES if name.endswith("-detach")])
def test_detach_keeps_the_margin_value_and_the_plain_cosine_gradient(name, groups):
    _, _, detached, _ = CASES[name]
    _, _, margined, reference = CASES[name.removesuffix("-detach")]
    image, text, norms = _leaves(seed=9)
    value = detached(image, text, SCALE, groups, "mean", norms)
    # forward: the margin version's value
    torch.testing.assert_close(value, margined(image, text, SCALE, groups, "mean", norms), rtol=1e-12, atol=1e-12)
    # gradient: that of the plain form, logits s·(C + δ) with each δ = ψ(C) − C a constant recorded
    # here, from autograd through the loop transcription
    offsets = R.Offsets()
    reference(image.detach(), text.detach(), SCALE, groups, norms, d=offsets)
    plain = reference(image, text, SCALE, groups, norms, d=offsets.replay()).mean()
    torch.testing.assert_close(plain, value, rtol=1e-10, atol=1e-12)
    leaves = [image, text] + (list(norms) if _reads_norms(name) else [])
    for got, want in zip(torch.autograd.grad(value, leaves), torch.autograd.grad(plain, leaves)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


def test_detach_changes_the_gradient_where_psi_is_not_a_shift():
    image, text, _ = _leaves(seed=10)
    plain = torch.autograd.grad(M.arcface_loss(image, text, SCALE, 0.5), image)[0]
    detached = torch.autograd.grad(M.arcface_loss(image, text, SCALE, 0.5, detach=True), image)[0]
    assert not torch.allclose(plain, detached)
    # CosFace's offset −m is a constant: detaching it changes nothing
    plain = torch.autograd.grad(M.cosface_loss(image, text, SCALE, 0.3), image)[0]
    detached = torch.autograd.grad(M.cosface_loss(image, text, SCALE, 0.3, detach=True), image)[0]
    torch.testing.assert_close(plain, detached, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# identical and antipodal pairs, fp32 and bf16


@pytest.mark.parametrize("pair", ["identical", "antipodal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_identical_and_antipodal_pairs_stay_finite(name, dtype, pair):
    _, _, function, _ = CASES[name]
    raw = torch.randn(6, 8, generator=torch.Generator().manual_seed(11), requires_grad=True)
    image = tf.normalize(raw, dim=1).to(dtype)
    text = image if pair == "identical" else -image
    norms = tuple(n.float().requires_grad_() for n in raw_norms())
    loss = function(image, text, torch.tensor(30.0, requires_grad=True), GROUPS if pair == "identical" else None,
                    "mean", norms)
    assert torch.isfinite(loss) and loss.dtype == torch.float32
    loss.backward()
    assert torch.isfinite(raw.grad).all()


# --------------------------------------------------------------------------------------------
# Cam-Softmax's schedule and exponent


def test_cam_softmax_schedule_is_the_stepwise_decay_and_resumes_exactly():
    c_start, c_stop, c_decay = math.pi / 2, math.pi / 4, 3e-3
    c, simulated = c_start, []
    for _ in range(400):  # the authors' per-iteration update, applied one step at a time
        simulated.append(c)
        c = max(c_stop, c - c_decay)
    scheduled = [M.cam_softmax_c(step, c_start, c_stop, c_decay) for step in range(400)]
    assert scheduled == pytest.approx(simulated, abs=1e-12)
    assert scheduled[-1] == c_stop and scheduled[0] == c_start
    # a run resumed at step 123 computes the same c as the uninterrupted one, from the step alone
    assert M.cam_softmax_c(123, c_start, c_stop, c_decay) == scheduled[123]
    # upward schedules hold at c_stop too
    assert M.cam_softmax_c(10_000, 1.0, 1.5, 1e-3) == 1.5
    assert M.cam_softmax_c(100, 1.0, 1.5, 1e-3) == pytest.approx(1.1)


@pytest.mark.parametrize("c", [0.3, math.pi / 4, 1.45, math.pi / 2, 2.0, 3.0])
def test_cam_softmax_target_activation_is_zero_at_c(c):
    p = M.cam_softmax_exponent(c)
    assert 2 * ((1 + math.cos(c)) / 2) ** p - 1 == pytest.approx(0.0, abs=1e-12)
    assert (p > 1) == (c < math.pi / 2)
    assert M.cam_softmax_exponent(math.pi / 2) == 1.0


# --------------------------------------------------------------------------------------------
# SphereFace2's bias start


@pytest.mark.parametrize("variant, margin", [("C", 0.0), ("C", 0.4), ("A", 0.4), ("M", 1.5)])
@pytest.mark.parametrize("lam, t, r, batch", [(0.5, 1.0, 10.0, 257), (0.7, 3.0, 40.0, 64), (0.9, 2.0, 5.0, 3)])
def test_sphereface2_bias_init_minimises_the_row_loss(variant, margin, lam, t, r, batch):
    from scipy.optimize import minimize_scalar

    def g(x):
        return 2 * ((1 + x) / 2) ** t - 1

    if variant == "C":
        positive, negative = r * (g(0) - margin), r * (g(0) + margin)
    else:
        angle = math.pi / 2 + margin if variant == "A" else margin * math.pi / 2
        positive, negative = r * g(math.cos(min(angle, math.pi))), r * g(0)

    def row_loss(b):
        return lam * math.log1p(math.exp(-(positive + b))) + (1 - lam) * (batch - 1) * math.log1p(math.exp(negative + b))

    found = minimize_scalar(row_loss, bracket=(-200.0, 0.0), tol=1e-12).x
    assert M.sphereface2_bias_init(batch, lam, t, margin, r, variant) == pytest.approx(found, abs=1e-5)


def test_sphereface2_bias_init_is_minus_log_b_minus_1_for_siglip_settings():
    for batch in (2, 32, 1024, 32768):
        assert M.sphereface2_bias_init(batch, 0.5, 1.0, 0.0, 10.0) == pytest.approx(-math.log(batch - 1), abs=1e-12)


@pytest.mark.parametrize("variant, margin", [("C", 0.4), ("A", 0.4), ("M", 1.5)])
def test_sphereface2_bias_init_zeroes_the_loss_gradient_on_orthogonal_features(variant, margin):
    # every cosine 0: the loss's own gradient in b vanishes at the start the initialiser gives
    batch, r, lam, t = 5, 12.0, 0.7, 3.0
    basis = torch.eye(2 * batch, dtype=torch.float64)
    image, text = basis[:batch], basis[batch:]
    bias = torch.tensor(M.sphereface2_bias_init(batch, lam, t, margin, r, variant), dtype=torch.float64,
                        requires_grad=True)
    loss = M.sphereface2_loss(image, text, r, bias, lam, margin, t, variant)
    (gradient,) = torch.autograd.grad(loss, bias)
    assert abs(gradient.item()) < 1e-12


# --------------------------------------------------------------------------------------------
# defaults and arguments


def test_defaults_keep_a_clip_like_positive_above_its_negatives():
    positive, negative = torch.tensor([[0.3, 0.1]], dtype=torch.float64), 0.1
    for name in ("cosface", "arcface", "sphereface_r", "cam_softmax"):
        term = TERMS[name](TERMS[name].Options())
        options = term.options
        if name == "cam_softmax":  # the schedule's end
            term = TERMS[name](TERMS[name].Options(c_start=options.c_stop, c_stop=options.c_stop))
        batch = M.MarginBatch(positive, None, None, 0, torch.tensor(1.0, dtype=torch.float64), 1e-6)
        transformed = term.transformed(positive, batch)[0, 0].item()
        assert negative < transformed < 0.3, (name, transformed)


@pytest.mark.parametrize("call, message", [
    (lambda i, t: M.cosface_loss(i, t, SCALE, -0.1), "margin"),
    (lambda i, t: M.arcface_loss(i, t, SCALE, 0.2, fallback="wrap"), "fallback"),
    (lambda i, t: M.sphereface_r_loss(i, t, SCALE, 0.5), "margin"),
    (lambda i, t: M.sphereface_r_loss(i, t, SCALE, 1.5, normalization="none"), "norms"),
    (lambda i, t: M.cam_softmax_loss(i, t, SCALE, 0.0), "c_start"),
    (lambda i, t: M.sface_loss(i, t, SCALE, inter_reduction="max"), "inter_reduction"),
    (lambda i, t: M.sphereface2_loss(i, t, SCALE, BIAS, variant="M", margin=0.4), "variant 'M'"),
    (lambda i, t: M.sphereface2_loss(i, t, SCALE, BIAS, t=0.5), "t="),
    (lambda i, t: M.cosface_loss(i, t, SCALE, reduction="avg"), "reduction"),
    (lambda i, t: M.cosface_loss(i, t[:3], SCALE), "same shape"),
])
def test_bad_arguments_raise_value_errors_naming_them(call, message):
    image, text = features()
    with pytest.raises(ValueError, match=message):
        call(image, text)


# --------------------------------------------------------------------------------------------
# what the objective passes to the terms: the training step and the norms, with their gradient


@pytest.mark.parametrize("normalization", ["none", "soft"])
def test_the_objective_passes_the_feature_norms_with_their_gradient(normalization):
    from mmsphere.losses import Objective
    from mmsphere.losses.config import LossConfig

    options = {"margin": 1.4, "version": "v0", "normalization": normalization, "detach": False,
               "norm_weight": 0.2, "norm_target": 4.0}
    objective = Objective(LossConfig(terms={"sphereface_r": {"weight": 1.0, **options}}))
    assert objective.needs_feature_norms
    image, text, norms = _leaves(seed=7)
    output = objective(image, text, SCALE, group_ids=GROUPS, image_norms=norms[0], text_norms=norms[1])
    expected = R.sphereface_r(image, text, SCALE, 1.4, "v0", normalization, GROUPS, False, norms=norms,
                              norm_weight=0.2, norm_target=4.0)
    torch.testing.assert_close(output.per_sample, expected, rtol=1e-10, atol=1e-12)
    leaves = [image, text, *norms]
    got = torch.autograd.grad(output.loss, leaves)
    want = torch.autograd.grad(expected.mean(), leaves)
    for actual, wanted in zip(got, want):
        torch.testing.assert_close(actual, wanted, rtol=1e-9, atol=1e-11)
    assert all(gradient.abs().sum() > 0 for gradient in got[2:])  # the norms are read, not constants
    with pytest.raises(ValueError, match="needs the features' norms before L2 normalisation"):
        objective(image, text, SCALE)


def test_the_objective_passes_the_training_step_to_the_schedule():
    from mmsphere.losses import Objective
    from mmsphere.losses.config import LossConfig

    options = {"c_start": 1.5, "c_stop": 0.9, "c_decay": 2e-3}
    objective = Objective(LossConfig(terms={"cam_softmax": {"weight": 1.0, **options}}))
    image, text = features(seed=8)
    for step in (0, 100, 5000):
        c = max(0.9, 1.5 - 2e-3 * step)  # the schedule, written out
        expected = R.cam_softmax(image, text, SCALE, c, GROUPS)
        output = objective(image, text, SCALE, group_ids=GROUPS, step=step)
        torch.testing.assert_close(output.per_sample, expected, rtol=1e-10, atol=1e-12)


def test_sface_weighting_reads_the_plain_cross_entropy_at_its_scale():
    """SFace's per-sample values can be negative: a WeightNet reads CLIP's loss at SFace's fixed scale instead."""
    from mmsphere.losses import Objective
    from mmsphere.losses.config import LossConfig

    image, text = features(seed=9)
    objective = Objective(LossConfig(terms={"sface": {"weight": 1.0, "scale": 9.0}}))
    seen = []
    output = objective(image, text, SCALE, group_ids=GROUPS, sample_weights=lambda x: seen.append(x) or torch.ones_like(x))
    expected = R.cosface(image, text, 9.0, 0.0, GROUPS)  # CosFace at m = 0 is CLIP's loss, written as loops
    torch.testing.assert_close(seen[0], expected, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(seen[0], output.per_sample.detach())  # not the SFace values themselves
    # every other term: the WeightNet reads its per-sample losses
    plain = Objective(LossConfig(terms={"cosface": {"weight": 1.0}}))
    evaluated = plain.evaluate(image, text, SCALE)
    torch.testing.assert_close(evaluated.weight_input, evaluated.per_sample.detach())


@pytest.mark.parametrize("groups", [None, GROUPS], ids=["single", "groups"])
def test_sface_a_b_are_quantiles_of_the_measured_angles(groups):
    import numpy as np

    image, text = features(batch=6, seed=10)
    ids = list(range(6)) if groups is None else groups.tolist()
    positive, negative = [], []
    for i in range(6):
        for j in range(6):
            cosine = sum(x * y for x, y in zip(image[i].tolist(), text[j].tolist()))
            (positive if ids[i] == ids[j] else negative).append(math.acos(max(-1.0, min(1.0, cosine))))
    a, b = M.sface_ab_from_features(image, text, groups, positive_quantile=0.2, negative_quantile=0.85)
    assert a == pytest.approx(float(np.quantile(positive, 0.2)), abs=1e-12)
    assert b == pytest.approx(float(np.quantile(negative, 0.85)), abs=1e-12)
    with pytest.raises(ValueError, match="every pair is a positive"):
        M.sface_ab_from_features(image, text, torch.zeros(6, dtype=torch.long))
