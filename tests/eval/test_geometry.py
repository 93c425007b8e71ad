"""Geometry diagnostics against loop-based float64 transcriptions of their definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mmsphere.eval import GEOMETRY_KEYS, chunked_uniformity, geometry_diagnostics


def unit_rows(rng: np.random.Generator, rows: int, dim: int = 8) -> np.ndarray:
    features = rng.standard_normal((rows, dim))
    return features / np.linalg.norm(features, axis=1, keepdims=True)


def loop_uniformity(x: np.ndarray, t: float = 2.0) -> float:
    terms = [math.exp(-t * sum((a - b) ** 2 for a, b in zip(x[i], x[j])))
             for i in range(len(x)) for j in range(i + 1, len(x))]
    return math.log(sum(terms) / len(terms))


def loop_angle(a: np.ndarray, b: np.ndarray) -> float:
    cosine = sum(float(p) * float(q) for p, q in zip(a, b))
    return math.degrees(math.acos(max(-1.0, min(1.0, cosine))))


def test_diagnostics_match_loop_reference_with_several_captions_per_video():
    rng = np.random.default_rng(0)
    videos = unit_rows(rng, 6)
    text_to_image = np.array([0, 0, 1, 2, 2, 2, 3, 4, 5, 5])
    captions = unit_rows(rng, 10) + 0.8 * videos[text_to_image]
    captions /= np.linalg.norm(captions, axis=1, keepdims=True)

    positive = [(int(video), caption) for caption, video in enumerate(text_to_image)]
    negative = [(video, caption) for caption in range(10) for video in range(6) if video != text_to_image[caption]]
    expected = {
        "alignment": sum(sum((a - b) ** 2 for a, b in zip(videos[v], captions[c])) for v, c in positive) / 10,
        "uniformity_image": loop_uniformity(videos),
        "uniformity_text": loop_uniformity(captions),
        "uniformity_union": loop_uniformity(np.concatenate([videos, captions])),
        "modality_gap": math.sqrt(sum((videos[:, d].mean() - captions[:, d].mean()) ** 2 for d in range(8))),
        "mean_positive_angle": sum(loop_angle(videos[v], captions[c]) for v, c in positive) / len(positive),
        "mean_negative_angle": sum(loop_angle(videos[v], captions[c]) for v, c in negative) / len(negative),
    }
    for chunk_size in (1, 4, None):
        actual = geometry_diagnostics(torch.from_numpy(videos), captions, text_to_image, chunk_size=chunk_size)
        assert set(actual) == set(GEOMETRY_KEYS)
        for key, value in expected.items():
            assert actual[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (key, chunk_size)


def test_one_caption_per_image_pairs_row_i_with_row_i():
    rng = np.random.default_rng(1)
    images, texts = unit_rows(rng, 5), unit_rows(rng, 5)
    assert geometry_diagnostics(images, texts) == pytest.approx(geometry_diagnostics(images, texts, np.arange(5)))


def test_identical_modalities_have_zero_gap_and_zero_alignment():
    rng = np.random.default_rng(2)
    features = unit_rows(rng, 7)
    diagnostics = geometry_diagnostics(features, features.copy())
    assert diagnostics["alignment"] == pytest.approx(0.0, abs=1e-12)
    assert diagnostics["modality_gap"] == pytest.approx(0.0, abs=1e-12)
    assert diagnostics["mean_positive_angle"] == pytest.approx(0.0, abs=1e-4)


@pytest.mark.parametrize("t", [0.5, 2.0])
@pytest.mark.parametrize("chunk_size", [1, 5, None])
def test_chunked_uniformity_matches_the_loop(t, chunk_size):
    features = unit_rows(np.random.default_rng(3), 13)
    assert chunked_uniformity(features, t, chunk_size=chunk_size) == pytest.approx(loop_uniformity(features, t),
                                                                                    rel=1e-9)


def test_chunked_uniformity_matches_the_loss_library():
    from mmsphere.losses.functional import uniformity

    features = torch.from_numpy(unit_rows(np.random.default_rng(4), 20)).float()
    assert chunked_uniformity(features, 2.0, chunk_size=3) == pytest.approx(float(uniformity(features, 2.0)), rel=1e-5)


def test_collapsed_features_have_uniformity_zero():
    assert chunked_uniformity(np.tile(np.array([[0.6, 0.8]]), (4, 1))) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize(
    "images, texts, text_to_image, message",
    [
        (np.ones((3, 4)), np.ones((3, 5)), None, "4-dimensional but text_features are 5"),
        (np.ones((3, 4)), np.ones((4, 4)), None, "4 captions and 3 images"),
        (np.ones((3, 4)), np.ones((4, 4)), np.array([0, 1, 2]), "must be 4 integer image indices"),
        (np.ones((3, 4)), np.ones((2, 4)), np.array([0, 3]), r"outside \[0, 3\)"),
        (np.ones((1, 4)), np.ones((1, 4)), None, "at least 2 images"),
        (np.array([[1.0, np.nan], [0.0, 1.0]]), np.ones((2, 2)), None, "image_features has non-finite values in row 0"),
        (np.ones((2, 2)), np.ones((2, 2), dtype=np.int64), None, "text_features must be a floating-point"),
    ],
)
def test_bad_input_raises_one_clear_error(images, texts, text_to_image, message):
    with pytest.raises(ValueError, match=message):
        geometry_diagnostics(images, texts, text_to_image)
