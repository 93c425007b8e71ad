"""OoD scores against loop-based float64 transcriptions of their papers' formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mmsphere.ood import (
    cosine_logits,
    energy_score,
    maxlogit_score,
    mcm_score,
    msp_score,
    neglabel_score,
    ood_score,
)


def unit_rows(rng: np.random.Generator, rows: int, dim: int = 12) -> np.ndarray:
    features = rng.standard_normal((rows, dim))
    return (features / np.linalg.norm(features, axis=1, keepdims=True)).astype(np.float32)


def cosines(images: np.ndarray, classes: np.ndarray) -> list[list[float]]:
    return [[sum(float(a) * float(b) for a, b in zip(image, label)) for label in classes] for image in images]


@pytest.fixture
def features():
    rng = np.random.default_rng(0)
    return unit_rows(rng, 9), unit_rows(rng, 5), unit_rows(rng, 7)


@pytest.mark.parametrize("temperature", [1.0, 0.1, 0.01])
def test_mcm_is_the_largest_softmax_of_cosines_over_t(features, temperature):
    images, classes, _ = features
    expected = []
    for row in cosines(images, classes):
        exponentials = [math.exp(value / temperature) for value in row]
        expected.append(max(exponentials) / sum(exponentials))
    np.testing.assert_allclose(mcm_score(images, classes, temperature).numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(ood_score("mcm", images, classes, temperature=temperature).numpy(), expected,
                               rtol=1e-6)


def test_logit_scores_match_their_formulas():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 0.0, 0.0], [10.0, 9.0, -3.0]])
    rows = logits.tolist()
    np.testing.assert_allclose(maxlogit_score(logits).numpy(), [max(row) for row in rows])
    np.testing.assert_allclose(msp_score(logits).numpy(),
                               [math.exp(max(row)) / sum(math.exp(v) for v in row) for row in rows])
    for temperature in (1.0, 2.5):
        np.testing.assert_allclose(
            energy_score(logits, temperature).numpy(),
            [temperature * math.log(sum(math.exp(v / temperature) for v in row)) for row in rows])


@pytest.mark.parametrize("name", ["msp", "maxlogit", "energy"])
def test_dispatch_builds_logits_as_cosine_over_temperature(features, name):
    images, classes, _ = features
    logits = torch.tensor(cosines(images, classes), dtype=torch.float64) / 0.01
    function = {"msp": msp_score, "maxlogit": maxlogit_score, "energy": energy_score}[name]
    np.testing.assert_allclose(ood_score(name, images, classes, temperature=0.01).numpy(),
                               function(logits).numpy(), rtol=1e-6)
    np.testing.assert_allclose(cosine_logits(images, classes, 0.01).numpy(), logits.numpy(), rtol=1e-6)


def test_neglabel_is_the_id_share_of_the_softmax_mass(features):
    images, classes, negatives = features
    temperature = 0.05
    expected = []
    for id_row, negative_row in zip(cosines(images, classes), cosines(images, negatives)):
        id_mass = sum(math.exp(value / temperature) for value in id_row)
        negative_mass = sum(math.exp(value / temperature) for value in negative_row)
        expected.append(id_mass / (id_mass + negative_mass))
    np.testing.assert_allclose(neglabel_score(images, classes, negatives, temperature).numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(
        ood_score("neglabel", images, classes, temperature=temperature, negative_features=negatives).numpy(),
        expected, rtol=1e-6)


def test_neglabel_stays_finite_at_the_papers_temperature():
    images = np.array([[1.0, 0.0]], dtype=np.float32)
    scores = neglabel_score(images, np.array([[1.0, 0.0]]), np.array([[-1.0, 0.0]]), temperature=0.001)
    assert torch.isfinite(scores).all() and scores.item() == pytest.approx(1.0)


def test_higher_score_means_more_in_distribution(features):
    images, classes, _ = features
    # an image lying on a class direction versus one orthogonal to every class
    near = classes[:1]
    far = np.linalg.svd(classes)[2][-1:].astype(np.float32)
    for name in ("mcm", "msp", "maxlogit", "energy"):
        assert ood_score(name, near, classes, temperature=0.1) > ood_score(name, far, classes, temperature=0.1), name


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda i, c, n: ood_score("odin", i, c, temperature=1.0), "score 'odin' is unknown"),
        (lambda i, c, n: ood_score("neglabel", i, c, temperature=1.0), "needs negative label features"),
        (lambda i, c, n: ood_score("mcm", i, c, temperature=1.0, negative_features=n), "only used by the neglabel"),
        (lambda i, c, n: ood_score("mcm", i, c[:, :4], temperature=1.0), "12-dimensional but class_features are 4"),
        (lambda i, c, n: ood_score("mcm", i, c, temperature=0.0), "temperature=0.0 must be a finite number > 0"),
        (lambda i, c, n: ood_score("mcm", np.full_like(i, np.nan), c, temperature=1.0),
         "image_features has non-finite values in row 0"),
        (lambda i, c, n: energy_score(torch.ones(3), 1.0), r"logits must be a \[N, K\] tensor"),
        (lambda i, c, n: msp_score(torch.tensor([[0.0, float("inf")]])), "non-finite"),
    ],
)
def test_bad_input_raises_one_clear_error(features, call, message):
    with pytest.raises(ValueError, match=message):
        call(*features)
