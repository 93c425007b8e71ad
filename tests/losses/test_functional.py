"""The nine functions of mmsphere.losses.functional against independent references.

References: ``open_clip.ClipLoss`` and ``open_clip.loss.SigLipLoss``; Wang & Isola's ``pdist``
formulation of uniformity; and
loop-based float64 transcriptions of every formula below, written over Python floats with explicit
loops over i and j, sharing no code with ``mmsphere.losses``. Gradients are checked against finite
differences (``torch.autograd.gradcheck``).
"""

from __future__ import annotations

import math

import open_clip
import pytest
import torch
import torch.nn.functional as tf

from mmsphere.losses import functional as F

HALF = (torch.float16, torch.bfloat16)


def unit_rows(batch: int, dim: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return tf.normalize(torch.randn(batch, dim, generator=generator, dtype=torch.float64), dim=1).to(dtype)


# --------------------------------------------------------------------------------------------
# loop transcriptions (python floats, float64)


def dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def log_sum_exp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(value - top) for value in values))


def loop_symmetric_ce(logits: list[list[float]]) -> list[float]:
    size = len(logits)
    per_sample = []
    for i in range(size):
        row = log_sum_exp([logits[i][j] for j in range(size)]) - logits[i][i]
        column = log_sum_exp([logits[j][i] for j in range(size)]) - logits[i][i]
        per_sample.append(0.5 * (row + column))
    return per_sample


def loop_clip(img, txt, scale) -> list[float]:
    return loop_symmetric_ce([[scale * dot(a, b) for b in txt] for a in img])


def loop_angular_margin(img, txt, scale, margin, eps=1e-6) -> list[float]:
    logits = [[scale * dot(a, b) for b in txt] for a in img]
    for i in range(len(img)):
        cosine = min(max(dot(img[i], txt[i]), -1 + eps), 1 - eps)
        logits[i][i] = scale * math.cos(math.acos(cosine) - margin)
    return loop_symmetric_ce(logits)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def clamped_margin_cosine(cosine: float, margin: float, eps: float = 1e-6) -> float:
    return math.cos(math.acos(min(max(cosine, -1 + eps), 1 - eps)) - margin)


def loop_multi_positive_ce(logits: list[list[float]], groups: list[int]) -> list[float]:
    """½[CE_P(L)_i + CE_P(Lᵀ)_i], CE_P the mean of −log softmax over the positives P(i) = {j : g_j = g_i}."""
    size = len(logits)
    per_sample = []
    for i in range(size):
        positives = [j for j in range(size) if groups[j] == groups[i]]
        row_lse = log_sum_exp([logits[i][j] for j in range(size)])
        column_lse = log_sum_exp([logits[j][i] for j in range(size)])
        row = sum(row_lse - logits[i][p] for p in positives) / len(positives)
        column = sum(column_lse - logits[p][i] for p in positives) / len(positives)
        per_sample.append(0.5 * (row + column))
    return per_sample


def loop_grouped_angular_margin(img, txt, scale, margin, groups, eps=1e-6) -> list[float]:
    size = len(img)
    logits = [[scale * (clamped_margin_cosine(dot(img[i], txt[j]), margin, eps) if groups[i] == groups[j]
                        else dot(img[i], txt[j])) for j in range(size)] for i in range(size)]
    return loop_multi_positive_ce(logits, groups)


def loop_siglip(img, txt, scale, bias, margin, groups=None, eps=1e-6) -> list[float]:
    """−½[Σ_j log σ(z_ij L_ij) + Σ_j log σ(z_ji L_ji)]; margin 0 is plain SigLIP (no clamp)."""
    size = len(img)
    groups = list(range(size)) if groups is None else groups
    log_likelihood = [[0.0] * size for _ in range(size)]
    for i in range(size):
        for j in range(size):
            cosine = dot(img[i], txt[j])
            positive = groups[i] == groups[j]
            if positive and margin != 0:
                cosine = clamped_margin_cosine(cosine, margin, eps)
            logit = scale * cosine + bias
            log_likelihood[i][j] = log_sigmoid(logit if positive else -logit)
    return [-0.5 * (sum(log_likelihood[i][j] for j in range(size)) + sum(log_likelihood[j][i] for j in range(size)))
            for i in range(size)]


def loop_slerp(a, b, lam) -> list[list[float]]:
    out = []
    for i in range(len(a)):
        weight = lam[i] if isinstance(lam, list) else lam
        theta = math.acos(dot(a[i], b[i]))
        first, second = math.sin(weight * theta) / math.sin(theta), math.sin((1 - weight) * theta) / math.sin(theta)
        out.append([first * x + second * y for x, y in zip(a[i], b[i])])
    return out


def loop_m2mix(img, txt, lam, tau) -> list[float]:
    mixed = loop_slerp(img, txt, lam)
    size, per_sample = len(img), []
    for i in range(size):
        image_row = [dot(img[i], txt[j]) / tau if i == j else dot(img[i], mixed[j]) / tau for j in range(size)]
        text_row = [dot(txt[i], img[j]) / tau if i == j else dot(txt[i], mixed[j]) / tau for j in range(size)]
        per_sample.append(0.5 * ((log_sum_exp(image_row) - image_row[i]) + (log_sum_exp(text_row) - text_row[i])))
    return per_sample


def loop_alignment(x, y, alpha) -> list[float]:
    return [math.sqrt(sum((a - b) ** 2 for a, b in zip(x[i], y[i]))) ** alpha for i in range(len(x))]


def loop_calibrated_uniformity(x, sim, t) -> float:
    size, total, count = len(x), 0.0, 0
    for i in range(size):
        for j in range(i + 1, size):
            distance = sum((a - b) ** 2 for a, b in zip(x[i], x[j]))
            total += math.exp(-t * (distance - 2 + 2 * sim[i][j]))
            count += 1
    return math.log(total / count)


def loop_uniformity(x, t) -> float:
    return loop_calibrated_uniformity(x, [[1.0] * len(x) for _ in x], t)


def loop_cma(img, txt, scale) -> list[float]:
    size = len(img)
    logits = [[scale * dot(img[i], txt[j]) for j in range(size)] for i in range(size)]
    return [-0.5 * (log_sum_exp(logits[k]) + log_sum_exp([logits[j][k] for j in range(size)])) for k in range(size)]


# --------------------------------------------------------------------------------------------
# float64 agreement of every function with its transcription


B, D = 6, 5


@pytest.fixture
def pair() -> tuple[torch.Tensor, torch.Tensor]:
    return unit_rows(B, D, seed=1), unit_rows(B, D, seed=2)


def test_clip_loss_matches_open_clip(pair):
    img, txt = (x.float().requires_grad_() for x in pair)
    ours_img, ours_txt = (x.detach().clone().requires_grad_() for x in (img, txt))
    for scale in (1.0, 14.3, 100.0):
        expected = open_clip.ClipLoss()(img, txt, scale)
        actual = F.clip_loss(ours_img, ours_txt, torch.tensor(scale))
        torch.testing.assert_close(actual, expected)
        expected.backward()
        actual.backward()
        torch.testing.assert_close(ours_img.grad, img.grad)
        torch.testing.assert_close(ours_txt.grad, txt.grad)


def test_every_function_matches_its_loop_transcription(pair):
    img, txt = pair
    a, b = img.tolist(), txt.tolist()
    scale, margin, lam, tau = 7.5, 0.3, 0.35, 0.07
    per_row_lam = [0.1, 0.9, 0.5, 0.0, 1.0, 0.25]
    sim = torch.rand(B, B, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 0.8
    cases = {
        "clip_loss": (F.clip_loss(img, txt, scale, reduction="none"), loop_clip(a, b, scale)),
        "angular_margin_loss": (F.angular_margin_loss(img, txt, scale, margin, reduction="none"),
                                loop_angular_margin(a, b, scale, margin)),
        "slerp": (F.slerp(img, txt, lam), loop_slerp(a, b, lam)),
        "slerp per row": (F.slerp(img, txt, torch.tensor(per_row_lam, dtype=torch.float64)),
                          loop_slerp(a, b, per_row_lam)),
        "m2mix_loss": (F.m2mix_loss(img, txt, lam, tau, reduction="none"), loop_m2mix(a, b, lam, tau)),
        "alignment": (F.alignment(img, txt, 1.5, reduction="none"), loop_alignment(a, b, 1.5)),
        "uniformity": (F.uniformity(img, 2.0), loop_uniformity(a, 2.0)),
        "calibrated_uniformity": (F.calibrated_uniformity(img, sim, 3.0),
                                  loop_calibrated_uniformity(a, sim.tolist(), 3.0)),
        "cma_regularizer": (F.cma_regularizer(img, txt, scale, reduction="none"), loop_cma(a, b, scale)),
        "siglip_loss": (F.siglip_loss(img, txt, scale, -2.5, margin, reduction="none"),
                        loop_siglip(a, b, scale, -2.5, margin)),
    }
    for name, (actual, expected) in cases.items():
        torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12,
                                   msg=lambda message, name=name: f"{name}: {message}")


def test_reductions_agree_with_per_sample(pair):
    img, txt = pair
    for function, arguments in ((F.clip_loss, (3.0,)), (F.angular_margin_loss, (3.0, 0.2)),
                                (F.m2mix_loss, (0.4,)), (F.alignment, ()), (F.cma_regularizer, (3.0,)),
                                (F.siglip_loss, (3.0, -1.0, 0.2))):
        per_sample = function(img, txt, *arguments, reduction="none")
        assert per_sample.shape == (B,)
        torch.testing.assert_close(function(img, txt, *arguments, reduction="mean"), per_sample.mean())
        torch.testing.assert_close(function(img, txt, *arguments, reduction="sum"), per_sample.sum())


@pytest.mark.parametrize("name", ["clip_loss", "angular_margin_loss", "slerp", "m2mix_loss", "alignment",
                                  "uniformity", "calibrated_uniformity", "cma_regularizer", "siglip_loss",
                                  "grouped clip_loss", "grouped angular_margin_loss", "grouped siglip_loss"])
def test_gradients_match_finite_differences(pair, name):
    img, txt = (x[:4, :3].clone().requires_grad_() for x in pair)
    scale = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-1.5, dtype=torch.float64, requires_grad=True)
    groups = torch.tensor([0, 1, 0, 2])
    sim = torch.rand(4, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64, requires_grad=True)
    functions = {
        "clip_loss": (lambda x, y, s: F.clip_loss(x, y, s, reduction="none"), (img, txt, scale)),
        "angular_margin_loss": (lambda x, y, s: F.angular_margin_loss(x, y, s, 0.4, reduction="none"),
                                (img, txt, scale)),
        "slerp": (lambda x, y: F.slerp(x, y, 0.3), (img, txt)),
        "m2mix_loss": (lambda x, y: F.m2mix_loss(x, y, 0.3, 0.5, reduction="none"), (img, txt)),
        "alignment": (lambda x, y: F.alignment(x, y, 1.5, reduction="none"), (img, txt)),
        "uniformity": (lambda x: F.uniformity(x, 2.0), (img,)),
        "calibrated_uniformity": (lambda x, s: F.calibrated_uniformity(x, s, 2.0), (img, sim)),
        "cma_regularizer": (lambda x, y, s: F.cma_regularizer(x, y, s, reduction="none"), (img, txt, scale)),
        "siglip_loss": (lambda x, y, s, b: F.siglip_loss(x, y, s, b, 0.4, reduction="none"), (img, txt, scale, bias)),
        "grouped clip_loss": (lambda x, y, s: F.clip_loss(x, y, s, reduction="none", group_ids=groups),
                              (img, txt, scale)),
        "grouped angular_margin_loss": (
            lambda x, y, s: F.angular_margin_loss(x, y, s, 0.4, reduction="none", group_ids=groups), (img, txt, scale)),
        "grouped siglip_loss": (
            lambda x, y, s, b: F.siglip_loss(x, y, s, b, 0.4, reduction="none", group_ids=groups),
            (img, txt, scale, bias)),
    }
    function, inputs = functions[name]
    assert torch.autograd.gradcheck(function, inputs)


def test_uniformity_matches_wang_isola_pdist():
    x = unit_rows(7, 4, seed=6)
    expected = torch.pdist(x, p=2).pow(2).mul(-2.0).exp().mean().log()
    torch.testing.assert_close(F.uniformity(x, 2.0), expected)


def test_calibrated_uniformity_with_unit_similarity_is_uniformity():
    x = unit_rows(7, 4, seed=7)
    for t in (0.5, 2.0, 5.0):
        torch.testing.assert_close(F.calibrated_uniformity(x, torch.ones(7, 7, dtype=x.dtype), t), F.uniformity(x, t))


def test_calibration_weakens_repulsion():
    x = unit_rows(7, 4, seed=8)
    weak = F.calibrated_uniformity(x, torch.full((7, 7), 0.2, dtype=x.dtype))
    strong = F.calibrated_uniformity(x, torch.full((7, 7), 0.8, dtype=x.dtype))
    assert strong < weak


# --------------------------------------------------------------------------------------------
# angular margin


def test_angular_margin_zero_is_clip_loss(pair):
    img, txt = (x.clone().requires_grad_() for x in pair)
    margin_img, margin_txt = (x.detach().clone().requires_grad_() for x in pair)
    expected = F.clip_loss(img, txt, 9.0, reduction="none")
    actual = F.angular_margin_loss(margin_img, margin_txt, 9.0, 0.0, reduction="none")
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-9)
    expected.sum().backward()
    actual.sum().backward()
    torch.testing.assert_close(margin_img.grad, img.grad, rtol=1e-7, atol=1e-7)


def test_subtractive_margin_makes_positives_easier(pair):
    img, txt = pair
    losses = [F.angular_margin_loss(img, txt, 10.0, margin) for margin in (0.0, 0.1, 0.3)]
    assert losses[0] > losses[1] > losses[2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *HALF], ids=str)
@pytest.mark.parametrize("relation", ["identical", "nearly identical", "antipodal"])
def test_angular_margin_gradients_are_finite_at_the_poles(dtype, relation):
    img = unit_rows(8, 16, seed=9, dtype=dtype)
    if relation == "identical":
        txt = img.clone()
    elif relation == "nearly identical":
        txt = tf.normalize(img.double() + 1e-7 * unit_rows(8, 16, seed=10), dim=1).to(dtype)
    else:
        txt = -img
    img, txt = img.requires_grad_(), txt.requires_grad_()
    # s = 10 keeps the softmax unsaturated, so the gradients are not all rounded to zero in fp16
    scale = torch.tensor(10.0, requires_grad=True)
    loss = F.angular_margin_loss(img, txt, scale, 0.5)
    loss.backward()
    assert loss.dtype == torch.promote_types(dtype, torch.float32)
    for gradient in (img.grad, txt.grad, scale.grad):
        assert torch.isfinite(gradient).all()
    assert img.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------
# SigLIP


@pytest.mark.parametrize("batch", [2, 5, 16])
def test_siglip_loss_matches_open_clip(batch):
    img, txt = unit_rows(batch, 8, seed=30), unit_rows(batch, 8, seed=31)
    reference = open_clip.loss.SigLipLoss()
    for scale, bias in ((1.0, 0.0), (10.0, -10.0), (100.0, -10.0), (3.7, 2.5), (50.0, -4.0)):
        inputs = [x.clone().requires_grad_() for x in (img, txt, torch.tensor(scale, dtype=torch.float64),
                                                          torch.tensor(bias, dtype=torch.float64))]
        ours = [x.detach().clone().requires_grad_() for x in inputs]
        expected = reference(*inputs)
        actual = F.siglip_loss(*ours)
        torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
        expected.backward()
        actual.backward()
        for mine, theirs in zip(ours, inputs):
            torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("margin", [0.0, 0.1, 0.5, 1.2])
@pytest.mark.parametrize(("scale", "bias"), [(10.0, -10.0), (2.0, 0.5)])
def test_siglip_loss_matches_its_loop_transcription(margin, scale, bias):
    img, txt = unit_rows(7, 5, seed=32), unit_rows(7, 5, seed=33)
    expected = torch.tensor(loop_siglip(img.tolist(), txt.tolist(), scale, bias, margin), dtype=torch.float64)
    actual = F.siglip_loss(img, txt, scale, torch.tensor([bias]), margin, reduction="none")
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
    # Σ_i ℓ_i = −Σ_ij log σ(z_ij L_ij): the two halves of ℓ_i count every pair once between them
    torch.testing.assert_close(F.siglip_loss(img, txt, scale, bias, margin, reduction="sum"), expected.sum())
    torch.testing.assert_close(F.siglip_loss(img, txt, scale, bias, margin), expected.sum() / 7)


def test_siglip_margin_makes_positives_easier(pair):
    img, txt = pair
    losses = [F.siglip_loss(img, txt, 10.0, -10.0, margin) for margin in (0.0, 0.1, 0.3)]
    assert losses[0] > losses[1] > losses[2]


def test_siglip_loss_is_finite_when_saturated():
    img = unit_rows(6, 4, seed=34, dtype=torch.float32).requires_grad_()
    loss = F.siglip_loss(img, -img.detach(), 100.0, -10.0, 0.3)
    loss.backward()
    assert torch.isfinite(loss) and loss > 100 and torch.isfinite(img.grad).all()


# --------------------------------------------------------------------------------------------
# multi-positive batches (group_ids)


GROUPINGS = {
    "pairs and a triple": [0, 0, 4, 4, 4, 9],
    "interleaved": [3, 1, 3, 1, 0, 3],
    "one group": [7, 7, 7, 7, 7, 7],
    "distinct": [5, -2, 11, 0, 3, 8],
}


@pytest.mark.parametrize("grouping", GROUPINGS, ids=str)
def test_group_losses_match_their_loop_transcriptions(pair, grouping):
    img, txt = pair
    a, b = img.tolist(), txt.tolist()
    groups = GROUPINGS[grouping]
    group_ids = torch.tensor(groups)
    scale, margin, bias = 7.5, 0.3, -2.0
    clip_logits = [[scale * dot(x, y) for y in b] for x in a]
    cases = {
        "clip_loss": (F.clip_loss(img, txt, scale, reduction="none", group_ids=group_ids),
                      loop_multi_positive_ce(clip_logits, groups)),
        "angular_margin_loss": (F.angular_margin_loss(img, txt, scale, margin, reduction="none", group_ids=group_ids),
                                loop_grouped_angular_margin(a, b, scale, margin, groups)),
        "siglip_loss": (F.siglip_loss(img, txt, scale, bias, margin, reduction="none", group_ids=group_ids),
                        loop_siglip(a, b, scale, bias, margin, groups)),
        "siglip_loss margin 0": (F.siglip_loss(img, txt, scale, bias, reduction="none", group_ids=group_ids),
                                 loop_siglip(a, b, scale, bias, 0.0, groups)),
    }
    for name, (actual, expected) in cases.items():
        torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12,
                                   msg=lambda message, name=name: f"{name}: {message}")
        for reduction, reduce in (("mean", torch.mean), ("sum", torch.sum)):
            function = getattr(F, name.split()[0])
            arguments = {"clip_loss": (scale,), "angular_margin_loss": (scale, margin),
                         "siglip_loss": (scale, bias, margin if name == "siglip_loss" else 0.0)}[function.__name__]
            torch.testing.assert_close(function(img, txt, *arguments, reduction=reduction, group_ids=group_ids),
                                       reduce(actual))


def test_duplicated_pairs_in_one_group():
    # a video and caption repeated in the batch (rows 0 and 3): SigLIP stops pushing the copies apart,
    # while the softmax target, uniform over two equal logits, costs what the single target did
    img = unit_rows(4, 6, seed=35)
    txt = tf.normalize(img + 0.2 * unit_rows(4, 6, seed=36), dim=1)  # matched pairs, as after training
    img[3], txt[3] = img[0], txt[0]
    separate, together = torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2, 0])
    assert (F.siglip_loss(img, txt, 10.0, -5.0, 0.2, group_ids=together)
            < F.siglip_loss(img, txt, 10.0, -5.0, 0.2, group_ids=separate))
    torch.testing.assert_close(F.clip_loss(img, txt, 20.0, reduction="none", group_ids=together),
                               F.clip_loss(img, txt, 20.0, reduction="none", group_ids=separate))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_distinct_group_ids_are_the_single_positive_form(dtype, reduction):
    img, txt = unit_rows(16, 8, seed=37, dtype=dtype), unit_rows(16, 8, seed=38, dtype=dtype)
    # unsorted, negative and strided ids: only equality between them matters
    ids = (torch.randperm(16, generator=torch.Generator().manual_seed(39)) * 3 - 20).repeat_interleave(2)[::2]
    calls = {
        "clip_loss": lambda **group: F.clip_loss(img, txt, 14.0, reduction, **group),
        "angular_margin_loss": lambda **group: F.angular_margin_loss(img, txt, 14.0, 0.25, reduction, **group),
        "siglip_loss": lambda **group: F.siglip_loss(img, txt, 10.0, -10.0, 0.25, reduction, **group),
        "siglip_loss margin 0": lambda **group: F.siglip_loss(img, txt, 10.0, -10.0, 0.0, reduction, **group),
    }
    for name, call in calls.items():
        single = call()
        for group_ids in (ids, torch.arange(16)):
            assert torch.equal(call(group_ids=group_ids), single), name


@pytest.mark.parametrize("name", ["clip_loss", "angular_margin_loss", "siglip_loss"])
@pytest.mark.parametrize("grouped", [False, True], ids=["single", "grouped"])
def test_identical_pairs_have_finite_gradients_with_a_margin(name, grouped):
    # duplicated rows in one group make the off-diagonal positives identical pairs as well
    x = unit_rows(3, 8, seed=40, dtype=torch.float32)
    img = torch.cat([x, x]).requires_grad_()
    txt = torch.cat([x, x]).requires_grad_()
    scale = torch.tensor(10.0, requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True)
    group = {"group_ids": torch.tensor([0, 1, 2, 0, 1, 2])} if grouped else {}
    if name == "clip_loss":
        loss = F.clip_loss(img, txt, scale, **group)
    elif name == "angular_margin_loss":
        loss = F.angular_margin_loss(img, txt, scale, 0.5, **group)
    else:
        loss = F.siglip_loss(img, txt, scale, bias, 0.5, **group)
    loss.backward()
    assert torch.isfinite(loss)
    for gradient in (img.grad, txt.grad, scale.grad):
        assert torch.isfinite(gradient).all()
    assert img.grad.abs().sum() > 0
    if name == "siglip_loss":
        assert torch.isfinite(bias.grad)


# --------------------------------------------------------------------------------------------
# slerp


def test_slerp_endpoints_are_exact():
    a, b = unit_rows(6, 5, seed=11, dtype=torch.float32), unit_rows(6, 5, seed=12, dtype=torch.float32)
    assert torch.equal(F.slerp(a, b, 1.0), a)
    assert torch.equal(F.slerp(a, b, 0.0), b)
    per_row = F.slerp(a, b, torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0]))
    assert torch.equal(per_row[0::2], a[0::2]) and torch.equal(per_row[1::2], b[1::2])
    assert torch.equal(F.slerp(a, a, 1.0), a)  # identical rows take the linear branch, still exact


def test_slerp_walks_the_geodesic():
    a, b = unit_rows(6, 5, seed=13), unit_rows(6, 5, seed=14)
    theta = torch.arccos((a * b).sum(dim=1))
    for lam in (0.2, 0.5, 0.8):
        point = F.slerp(a, b, lam)
        torch.testing.assert_close(torch.arccos((point * b).sum(dim=1).clamp(-1, 1)), lam * theta)
        torch.testing.assert_close(torch.arccos((point * a).sum(dim=1).clamp(-1, 1)), (1 - lam) * theta)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("offset", [0.0, 1e-9, 1e-6, 1e-3])
def test_slerp_is_unit_norm_and_stable_for_close_rows(dtype, offset):
    a = unit_rows(6, 5, seed=15)
    b = tf.normalize(a + offset * unit_rows(6, 5, seed=16), dim=1)
    a, b = a.to(dtype).requires_grad_(), b.to(dtype).requires_grad_()
    point = F.slerp(a, b, torch.linspace(0, 1, 6, dtype=dtype))
    tolerance = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(point.norm(dim=1), torch.ones(6, dtype=dtype), rtol=0, atol=tolerance)
    # for close rows the geodesic point lies within the (tiny) arc between the endpoints
    assert ((point - a).norm(dim=1) <= (a - b).norm(dim=1) + tolerance).all()
    point.sum().backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()


def test_slerp_of_antipodal_rows_is_finite():
    a = unit_rows(4, 5, seed=17).requires_grad_()
    point = F.slerp(a, -a.detach(), 0.3)
    point.sum().backward()
    assert torch.isfinite(point).all() and torch.isfinite(a.grad).all()


def rows_at_cosine(cosine: float, batch: int = 6, dim: int = 8, seed: int = 21) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit rows a, b (float64) with ⟨a_i, b_i⟩ = cosine: b = cosine·a + sqrt(1 − cosine²)·v, v ⟂ a."""
    a = unit_rows(batch, dim, seed=seed)
    v = unit_rows(batch, dim, seed=seed + 1)
    v = tf.normalize(v - (v * a).sum(dim=1, keepdim=True) * a, dim=1)
    return a, cosine * a + math.sqrt(max(0.0, 1 - cosine * cosine)) * v


def angle(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """∠(x_i, y_i) as 2·atan2(‖x − y‖, ‖x + y‖), accurate over all of [0, π] (arccos is not near ±1)."""
    return 2 * torch.atan2((x - y).norm(dim=1), (x + y).norm(dim=1))


# a half-precision output rounds each coordinate, and so the norm, by at most the unit roundoff
# (2^-11 for fp16, 2^-8 for bf16) relative; twice that is allowed
NORM_TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 2**-10, torch.bfloat16: 2**-7}
COSINES = [-1.0, -0.9999999, -0.999, 0.0, 0.999, 1.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *HALF], ids=str)
@pytest.mark.parametrize("cosine", COSINES)
def test_slerp_is_unit_norm_for_every_angle(dtype, cosine):
    a, b = (x.to(dtype).requires_grad_() for x in rows_at_cosine(cosine))
    point = F.slerp(a, b, torch.tensor([0.1, 0.3, 0.5, 0.5, 0.7, 0.9], dtype=dtype))
    norms = point.double().norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms), rtol=0, atol=NORM_TOLERANCE[dtype])
    point.float().sum().backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()


@pytest.mark.parametrize("cosine", [-0.999, -0.9, -0.3, 0.0, 0.4, 0.95, 0.999])
def test_slerp_matches_the_textbook_formula_away_from_the_poles(cosine):
    a, b = rows_at_cosine(cosine)
    lam = [0.0, 0.15, 0.5, 0.5, 0.85, 1.0]
    expected = torch.tensor(loop_slerp(a.tolist(), b.tolist(), lam), dtype=torch.float64)
    # the formula's weights grow like 1/sinθ, so does its own rounding: about 22·ε at cos = −0.999
    torch.testing.assert_close(F.slerp(a, b, torch.tensor(lam, dtype=torch.float64)), expected, rtol=0, atol=1e-13)
    actual32 = F.slerp(a.float(), b.float(), torch.tensor(lam))
    torch.testing.assert_close(actual32.double(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("cosine", [-1.0, -0.9999999, -0.999, 0.3])
def test_slerp_endpoints_and_geodesic_hold_near_antipodes(cosine):
    a, b = rows_at_cosine(cosine)
    theta = angle(a, b)
    assert torch.equal(F.slerp(a, b, 1.0), a) and torch.equal(F.slerp(a, b, 0.0), b)
    for lam in (0.1, 0.5, 0.9):
        point = F.slerp(a, b, lam)
        # on a great circle through b and a: λθ from b and (1 − λ)θ from a, adding up to θ
        torch.testing.assert_close(angle(point, b), lam * theta, rtol=0, atol=1e-9)
        torch.testing.assert_close(angle(point, a), (1 - lam) * theta, rtol=0, atol=1e-9)
    for lam in (0.1, 0.5, 0.9):  # fp32 stays on the same path, to its precision
        torch.testing.assert_close(F.slerp(a.float(), b.float(), lam).double(), F.slerp(a, b, lam), rtol=0, atol=2e-3
                                   if cosine < -0.99999 else 1e-5)


@pytest.mark.parametrize("cosine", [-0.999, 0.999, 1 - 5e-11], ids=["near antipodal", "close", "series branch"])
def test_slerp_gradients_match_finite_differences_near_the_poles(cosine):
    a, b = (x[:3].clone() for x in rows_at_cosine(cosine, dim=4))
    assert torch.autograd.gradcheck(lambda x, y: F.slerp(x, y, 0.3), (a.requires_grad_(), b.requires_grad_()))


def loop_antipodal_slerp(b: list[float], lam: float) -> list[float]:
    """The documented choice for a = −b: the great circle through b and e_k, k = first argmin |b_k|."""
    k = min(range(len(b)), key=lambda index: (abs(b[index]), index))
    direction = [(1.0 if index == k else 0.0) - b[k] * value for index, value in enumerate(b)]
    length = math.sqrt(sum(value * value for value in direction))
    return [math.cos(lam * math.pi) * y + math.sin(lam * math.pi) * w / length for y, w in zip(b, direction)]


def test_slerp_of_antipodal_rows_follows_the_documented_rule():
    b = unit_rows(5, 6, seed=23)
    # ties in |b_k| go to the first index: here coordinates 1 and 2 are both 0, so e_1 is taken
    b = torch.cat([b, torch.tensor([[0.6, 0.0, 0.0, 0.8, 0.0, 0.0]], dtype=torch.float64)])
    a = -b
    for lam in (0.25, 0.5, 0.8):
        expected = torch.tensor([loop_antipodal_slerp(row, lam) for row in b.tolist()], dtype=torch.float64)
        point = F.slerp(a, b, lam)
        torch.testing.assert_close(point, expected, rtol=0, atol=1e-12)
        # deterministic: the same for each row alone, on every call, in fp32, and from either end
        torch.testing.assert_close(torch.cat([F.slerp(a[i:i + 1], b[i:i + 1], lam) for i in range(6)]), point)
        assert torch.equal(F.slerp(a, b, lam), point)
        torch.testing.assert_close(F.slerp(a.float(), b.float(), lam).double(), expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(F.slerp(b, a, 1 - lam), point, rtol=0, atol=1e-12)
    torch.testing.assert_close(F.slerp(a, b, 0.5)[-1], torch.tensor([0.0, 1, 0, 0, 0, 0], dtype=torch.float64))


def test_slerp_on_the_zero_sphere_returns_the_nearer_endpoint():
    a, b = torch.tensor([[1.0], [-1.0]]), torch.tensor([[-1.0], [-1.0]])
    assert torch.equal(F.slerp(a, b, 0.3), b) and torch.equal(F.slerp(a, b, 0.5), a)


# --------------------------------------------------------------------------------------------
# dtypes, devices of the results, identical pairs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *HALF], ids=str)
def test_every_function_accepts_every_float_dtype(dtype):
    img, txt = unit_rows(6, 8, seed=18, dtype=dtype), unit_rows(6, 8, seed=19, dtype=dtype)
    compute = torch.promote_types(dtype, torch.float32)
    sim = torch.full((6, 6), 0.3, dtype=dtype)
    group_ids = torch.tensor([0, 1, 0, 2, 2, 3])
    results = [F.clip_loss(img, txt, 10.0), F.angular_margin_loss(img, txt, 10.0, 0.2), F.m2mix_loss(img, txt, 0.5),
               F.alignment(img, txt), F.uniformity(img), F.calibrated_uniformity(img, sim),
               F.cma_regularizer(img, txt, 10.0), F.siglip_loss(img, txt, 10.0, -10.0),
               F.siglip_loss(img, txt, 10.0, -10.0, 0.2), F.clip_loss(img, txt, 10.0, group_ids=group_ids),
               F.angular_margin_loss(img, txt, 10.0, 0.2, group_ids=group_ids),
               F.siglip_loss(img, txt, 10.0, -10.0, 0.2, group_ids=group_ids)]
    for result in results:
        assert result.dtype == compute and result.shape == () and torch.isfinite(result)
    mixed = F.slerp(img, txt, 0.5)
    assert mixed.dtype == dtype and mixed.shape == img.shape
    tolerance = 3e-2 if dtype in HALF else 1e-5
    for result, call in ((results[0], lambda x, y: F.clip_loss(x, y, 10.0)),
                         (results[7], lambda x, y: F.siglip_loss(x, y, 10.0, -10.0)),
                         (results[-1], lambda x, y: F.siglip_loss(x, y, 10.0, -10.0, 0.2, group_ids=group_ids))):
        torch.testing.assert_close(result.double(), call(img.double(), txt.double()), rtol=tolerance, atol=tolerance)


def test_identical_pairs_have_finite_gradients_everywhere():
    x = unit_rows(5, 4, seed=20).requires_grad_()
    total = (F.alignment(x, x.detach(), 1.0) + F.uniformity(torch.cat([x, x])) + F.m2mix_loss(x, x.detach(), 0.5)
             + F.cma_regularizer(x, x.detach(), 30.0) + F.clip_loss(x, x.detach(), 30.0)
             + F.siglip_loss(x, x.detach(), 30.0, -10.0) + F.siglip_loss(x, x.detach(), 30.0, -10.0, 0.3))
    total.backward()
    assert torch.isfinite(x.grad).all()


# --------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda x, y: F.clip_loss(x, y[:5], 1.0), r"img and txt must have the same shape .*\[6, 4\] and \[5, 4\]"),
        (lambda x, y: F.clip_loss(x, y[:, :3], 1.0), r"same shape .*\[6, 4\] and \[6, 3\]"),
        (lambda x, y: F.clip_loss(x[:0], y[:0], 1.0), r"img must hold at least 1 rows .*\[0, 4\]"),
        (lambda x, y: F.clip_loss(x[0], y[0], 1.0), r"img must be 2-D \[B, D\], got shape \[4\]"),
        (lambda x, y: F.clip_loss(x[None], y[None], 1.0), r"img must be 2-D .*\[1, 6, 4\]"),
        (lambda x, y: F.clip_loss(x, y, torch.ones(2)), r"logit_scale must be a float or a one-element tensor"),
        (lambda x, y: F.clip_loss(x, y, 1.0, reduction="avg"), r"reduction='avg' must be one of"),
        (lambda x, y: F.clip_loss(x.long(), y.long(), 1.0), r"img must be a float tensor"),
        (lambda x, y: F.angular_margin_loss(x, y, 1.0, -0.1), r"margin=-0.1 must be in \[0, π\)"),
        (lambda x, y: F.angular_margin_loss(x, y, 1.0, math.pi), r"margin=3.14\d* must be in \[0, π\)"),
        (lambda x, y: F.slerp(x, y[:3], 0.5), r"a and b must have the same shape .*\[6, 4\] and \[3, 4\]"),
        (lambda x, y: F.slerp(x, y, 1.5), r"lam=1.5 must be in \[0, 1\]"),
        (lambda x, y: F.slerp(x, y, torch.ones(4)), r"lam must be a float or a tensor of shape \[B\] = \[6\]"),
        (lambda x, y: F.m2mix_loss(x, y, 0.5, tau_mix=0.0), r"tau_mix=0.0 must be > 0"),
        (lambda x, y: F.alignment(x, y[:2]), r"x and y must have the same shape"),
        (lambda x, y: F.uniformity(x[:1]), r"x must hold at least 2 rows .*\[1, 4\]"),
        (lambda x, y: F.uniformity(x, t=0.0), r"t=0.0 must be > 0"),
        (lambda x, y: F.calibrated_uniformity(x, torch.ones(5, 5)),
         r"sim must be a tensor of shape \[B, B\] = \[6, 6\] .*\[5, 5\]"),
        (lambda x, y: F.cma_regularizer(x, y.T, 1.0), r"img and txt must have the same shape .*\[6, 4\] and \[4, 6\]"),
        (lambda x, y: F.siglip_loss(x, y[:5], 1.0, 0.0), r"img and txt must have the same shape .*\[5, 4\]"),
        (lambda x, y: F.siglip_loss(x, y, 1.0, torch.zeros(2)),
         r"logit_bias must be a float or a one-element tensor, got shape \[2\]"),
        (lambda x, y: F.siglip_loss(x, y, 1.0, 0.0, margin=-0.1), r"margin=-0.1 must be in \[0, π\)"),
        (lambda x, y: F.siglip_loss(x, y, 1.0, 0.0, reduction="avg"), r"reduction='avg' must be one of"),
        (lambda x, y: F.clip_loss(x, y, 1.0, group_ids=torch.arange(5)),
         r"group_ids must have shape \[B\] = \[6\] for features of shape \[6, 4\], got \[5\]"),
        (lambda x, y: F.angular_margin_loss(x, y, 1.0, 0.1, group_ids=torch.arange(6)[:, None]),
         r"group_ids must have shape \[B\] = \[6\] .* got \[6, 1\]"),
        (lambda x, y: F.siglip_loss(x, y, 1.0, 0.0, group_ids=torch.tensor(3)),
         r"group_ids must have shape .*got \[\]"),
        (lambda x, y: F.clip_loss(x, y, 1.0, group_ids=torch.arange(6.0)),
         r"group_ids must be an integer tensor, got torch.float32"),
        (lambda x, y: F.siglip_loss(x, y, 1.0, 0.0, group_ids=torch.ones(6, dtype=torch.bool)),
         r"group_ids must be an integer tensor, got torch.bool"),
        (lambda x, y: F.angular_margin_loss(x, y, 1.0, 0.1, group_ids=[0, 1, 2, 3, 4, 5]),
         r"group_ids must be None or an integer tensor of shape \[B\] = \[6\], got list"),
        (lambda x, y: F.clip_loss(x, y, 1.0, group_ids=torch.arange(6, device="meta")),
         r"group_ids must be on the features' device cpu, got meta"),
    ],
)
def test_bad_input_raises_a_clear_value_error(call, message):
    img, txt = unit_rows(6, 4, seed=21), unit_rows(6, 4, seed=22)
    with pytest.raises(ValueError, match=message):
        call(img, txt)
