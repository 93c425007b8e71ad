"""retrieval_metrics, dual_softmax and topk_search against loop-based float64 transcriptions.

The rank and tie rule transcribed are those of ARCHITECTURE.md, Evaluation conventions.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmsphere.eval import dual_softmax, metrics_from_ranks, retrieval_metrics, retrieval_ranks, topk_search
from tests.eval.retrieval_reference import loop_dual_softmax, loop_metrics, loop_ranks


def assert_metrics_equal(actual: dict[str, float], expected: dict[str, float]) -> None:
    assert set(actual) == {"R@1", "R@5", "R@10", "MdR", "MnR"}
    for key, value in expected.items():
        assert actual[key] == pytest.approx(value, abs=1e-9), key


def tied_similarity(rng: np.random.Generator, queries: int, gallery: int) -> np.ndarray:
    # one decimal makes ties frequent, so the tie rule is exercised on every row
    return np.round(rng.uniform(-1, 1, size=(queries, gallery)), 1).astype(np.float32)


def test_square_matrix_matches_loop_reference():
    rng = np.random.default_rng(0)
    sim = tied_similarity(rng, 40, 40)
    sim[np.arange(40), np.arange(40)] += 0.3  # a model that is right some of the time
    expected = loop_ranks(sim, [[query] for query in range(40)])
    np.testing.assert_array_equal(retrieval_ranks(sim), expected)
    assert_metrics_equal(retrieval_metrics(sim), loop_metrics(expected))


def test_one_ground_truth_per_query_on_a_rectangular_matrix():
    rng = np.random.default_rng(1)
    sim = tied_similarity(rng, 60, 25)
    query_to_gallery = rng.integers(0, 25, size=60)
    expected = loop_ranks(sim, [[int(item)] for item in query_to_gallery])
    np.testing.assert_array_equal(retrieval_ranks(sim, query_to_gallery), expected)
    assert_metrics_equal(retrieval_metrics(torch.from_numpy(sim), torch.from_numpy(query_to_gallery)),
                         loop_metrics(expected))


def test_several_captions_per_video_both_directions():
    rng = np.random.default_rng(2)
    captions_per_video = rng.integers(1, 6, size=15)
    caption_to_video = np.repeat(np.arange(15), captions_per_video)
    text_to_video = tied_similarity(rng, caption_to_video.size, 15)
    text_to_video[np.arange(caption_to_video.size), caption_to_video] += 0.2

    t2v_expected = loop_ranks(text_to_video, [[int(video)] for video in caption_to_video])
    assert_metrics_equal(retrieval_metrics(text_to_video, caption_to_video), loop_metrics(t2v_expected))

    captions_of_video = [np.flatnonzero(caption_to_video == video).tolist() for video in range(15)]
    video_to_text = np.ascontiguousarray(text_to_video.T)
    v2t_expected = loop_ranks(video_to_text, captions_of_video)
    np.testing.assert_array_equal(retrieval_ranks(video_to_text, captions_of_video), v2t_expected)
    assert_metrics_equal(retrieval_metrics(video_to_text, captions_of_video), loop_metrics(v2t_expected))
    # a 2-D integer array is the same as a list of equal-length sequences
    pairs = [[0, 1], [2, 3], [4, 5]]
    np.testing.assert_array_equal(retrieval_ranks(video_to_text[:3], np.array(pairs)),
                                  retrieval_ranks(video_to_text[:3], pairs))


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 64, None])
def test_chunked_equals_one_full_chunk(chunk_size):
    rng = np.random.default_rng(3)
    sim = tied_similarity(rng, 50, 30)
    truths = [rng.choice(30, size=int(rng.integers(1, 4)), replace=False).tolist() for _ in range(50)]
    full = retrieval_ranks(sim, truths, chunk_size=50)
    np.testing.assert_array_equal(retrieval_ranks(sim, truths, chunk_size=chunk_size), full)
    np.testing.assert_array_equal(full, loop_ranks(sim, truths))


def test_hand_built_ties_count_against_the_query():
    sim = np.array([[0.5, 0.5, 0.1],   # tie with a wrong item: rank 1
                    [0.2, 0.9, 0.9],   # tie after the ground truth: still rank 1
                    [0.3, 0.3, 0.3]],  # everything tied: rank 2
                   dtype=np.float32)
    np.testing.assert_array_equal(retrieval_ranks(sim), [1, 1, 2])
    assert retrieval_metrics(sim) == {"R@1": 0.0, "R@5": 100.0, "R@10": 100.0, "MdR": 2.0, "MnR": 7 / 3}
    # two ground-truth items tied with each other do not count against the query, a third item does
    tied_truths = np.array([[0.5, 0.5, 0.5, 0.1], [0.7, 0.7, 0.2, 0.1]], dtype=np.float32)
    np.testing.assert_array_equal(retrieval_ranks(tied_truths, [[0, 1], [0, 1]]), [1, 0])


@pytest.mark.parametrize("size", [5, 20])
def test_collapsed_model_scores_zero_recall_at_one(size):
    sim = torch.full((size, size), 0.25)
    metrics = retrieval_metrics(sim)
    assert metrics["R@1"] == 0.0
    assert metrics["MdR"] == metrics["MnR"] == float(size)
    assert metrics["R@10"] == (100.0 if size <= 10 else 0.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_any_float_dtype_scores_like_its_float64_values(dtype):
    generator = torch.Generator().manual_seed(4)
    sim = torch.randn(30, 30, generator=generator).to(dtype)
    expected = loop_ranks(sim.double().numpy(), [[query] for query in range(30)])
    np.testing.assert_array_equal(retrieval_ranks(sim, chunk_size=8), expected)


def test_metrics_from_ranks_uses_the_mean_of_the_two_middle_ranks():
    assert metrics_from_ranks(np.array([0, 3, 9, 20])) == {
        "R@1": 25.0, "R@5": 50.0, "R@10": 75.0, "MdR": 7.0, "MnR": 9.0}


@pytest.mark.parametrize(
    "sim, query_to_gallery, message",
    [
        (np.zeros((3, 4), dtype=np.float32), None, "square"),
        (np.zeros((3, 4), dtype=np.float32), [0, 1], "2 entries but the similarity matrix has 3"),
        (np.zeros((3, 4), dtype=np.float32), [0, 1, 4], r"gallery item 4, outside \[0, 4\)"),
        (np.zeros((3, 4), dtype=np.float32), [0, 1, -1], "outside"),
        (np.zeros((2, 4), dtype=np.float32), [[0], []], r"query_to_gallery\[1\] is empty"),
        (np.zeros((2, 4), dtype=np.float32), [[0], [2, 2]], "twice"),
        (np.zeros((2, 4), dtype=np.float32), [[0], ["a"]], r"query_to_gallery\[1\]"),
        (np.zeros((2, 4), dtype=np.float32), np.array([0.0, 1.0]), "integers"),
        (np.zeros((2, 2, 2), dtype=np.float32), None, "matrix"),
        (np.zeros((0, 4), dtype=np.float32), None, "empty"),
        (np.zeros((2, 2), dtype=np.int64), None, "floating-point"),
        ([[0.0, 1.0], [1.0, 0.0]], None, "numpy array or a torch tensor"),
        (np.array([[0.0, 1.0], [np.nan, 0.0]], dtype=np.float32), None, "non-finite scores in query row 1"),
    ],
)
def test_bad_input_raises_one_clear_error(sim, query_to_gallery, message):
    with pytest.raises(ValueError, match=message):
        retrieval_metrics(sim, query_to_gallery)


def test_bad_chunk_size_is_rejected():
    with pytest.raises(ValueError, match="chunk_size=0"):
        retrieval_metrics(np.eye(3, dtype=np.float32), chunk_size=0)


def test_dual_softmax_matches_loop_reference():
    rng = np.random.default_rng(5)
    sim = rng.uniform(-0.2, 0.6, size=(12, 9))
    expected = loop_dual_softmax(sim, 0.05)
    for chunk_size in (1, 5, None):
        np.testing.assert_allclose(dual_softmax(sim, 0.05, chunk_size=chunk_size).numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(dual_softmax(torch.from_numpy(sim).float(), 0.05).numpy(), expected, rtol=1e-5)
    with pytest.raises(ValueError, match="temperature=0"):
        dual_softmax(sim, 0)


def test_faiss_exact_top_k_equals_torch_top_k():
    generator = torch.Generator().manual_seed(6)
    queries = torch.nn.functional.normalize(torch.randn(20, 16, generator=generator), dim=1)
    gallery = torch.nn.functional.normalize(torch.randn(500, 16, generator=generator), dim=1)
    scores, indices = topk_search(queries, gallery, 10)
    expected_scores, expected_indices = torch.topk(queries.double() @ gallery.double().T, 10, dim=1)
    np.testing.assert_array_equal(indices, expected_indices.numpy())
    np.testing.assert_allclose(scores, expected_scores.numpy(), atol=1e-5)
    assert indices.dtype == np.int64 and scores.dtype == np.float32
    _, single_thread_indices = topk_search(queries, gallery, 10, threads=1)
    np.testing.assert_array_equal(single_thread_indices, expected_indices.numpy())


def test_faiss_approximate_search_finds_most_exact_neighbours():
    rng = np.random.default_rng(7)
    queries = rng.standard_normal((30, 8)).astype(np.float32)
    gallery = rng.standard_normal((400, 8)).astype(np.float32)
    _, exact = topk_search(queries, gallery, 5)
    _, approximate = topk_search(queries, gallery, 5, approximate=True, threads=1)
    overlap = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(exact, approximate)])
    assert overlap >= 0.9


@pytest.mark.parametrize(
    "queries, gallery, k, message",
    [
        (np.ones((2, 4), np.float32), np.ones((5, 3), np.float32), 2, "4-dimensional but gallery_features are 3"),
        (np.ones((2, 4), np.float32), np.ones((5, 4), np.float32), 6, r"k=6 must be in \[1, 5\]"),
        (np.full((2, 4), np.nan, np.float32), np.ones((5, 4), np.float32), 2, "query_features has non-finite"),
        (np.ones((2, 4), np.float32), np.ones((0, 4), np.float32), 1, "gallery_features must be a non-empty"),
    ],
)
def test_topk_search_bad_input(queries, gallery, k, message):
    with pytest.raises(ValueError, match=message):
        topk_search(queries, gallery, k)
    with pytest.raises(ValueError, match="threads=0"):
        topk_search(np.ones((2, 4), np.float32), np.ones((5, 4), np.float32), 2, threads=0)
