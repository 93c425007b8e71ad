"""ood_metrics and roc_curve against scikit-learn and hand-computed cases with ties."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn import metrics as sk

from mmsphere.ood import mean_metrics, ood_metrics, roc_curve


def sklearn_reference(id_scores: np.ndarray, ood_scores: np.ndarray, positive: str) -> dict[str, float]:
    """The published recipes written with scikit-learn (MCM for positive='id', OpenOOD v1.5 for 'ood')."""
    scores = np.concatenate([id_scores, ood_scores])
    is_id = np.concatenate([np.ones(id_scores.size), np.zeros(ood_scores.size)])
    if positive == "id":
        fpr, tpr, _ = sk.roc_curve(is_id, scores, drop_intermediate=False)
    else:
        fpr, tpr, _ = sk.roc_curve(1 - is_id, -scores, drop_intermediate=False)
    return {
        "AUROC": sk.roc_auc_score(is_id, scores),
        "AUPR_IN": sk.average_precision_score(is_id, scores),
        "AUPR_OUT": sk.average_precision_score(1 - is_id, -scores),
        "FPR95": float(fpr[np.argmax(tpr >= 0.95)]),
    }


@pytest.mark.parametrize("positive", ["id", "ood"])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_scikit_learn(positive, ties, seed):
    rng = np.random.default_rng(seed)
    id_scores = rng.normal(1.0, 1.0, size=int(rng.integers(20, 300)))
    ood_scores = rng.normal(0.0, 1.0, size=int(rng.integers(20, 300)))
    if ties:
        id_scores, ood_scores = np.round(id_scores), np.round(ood_scores)
    actual = ood_metrics(id_scores, ood_scores, positive=positive)
    expected = sklearn_reference(id_scores, ood_scores, positive)
    assert set(actual) == {"AUROC", "AUPR_IN", "AUPR_OUT", "FPR95"}
    for key in expected:
        assert actual[key] == pytest.approx(expected[key], abs=1e-12), key


def test_perfect_separation():
    assert ood_metrics(np.array([2.0, 3.0, 4.0]), np.array([-1.0, 0.0])) == {
        "AUROC": 1.0, "AUPR_IN": 1.0, "AUPR_OUT": 1.0, "FPR95": 0.0}


def test_everything_tied_is_chance_and_flags_every_sample():
    metrics = ood_metrics(np.ones(3), np.ones(5))
    assert metrics["AUROC"] == 0.5
    assert metrics["AUPR_IN"] == pytest.approx(3 / 8)  # one threshold: precision = ID share, recall 1
    assert metrics["AUPR_OUT"] == pytest.approx(5 / 8)
    assert metrics["FPR95"] == 1.0


def test_fpr95_threshold_is_the_19th_of_20_id_scores_and_ties_count_as_false_positives():
    id_scores = np.arange(1.0, 21.0)  # keeping >= 95% of 20 = 19 samples: threshold 2.0
    ood_scores = np.array([0.0, 1.5, 2.0, 3.0])  # 2.0 ties the threshold and counts
    assert ood_metrics(id_scores, ood_scores)["FPR95"] == 0.5
    # the mirror image under the OpenOOD convention: 20 OoD scores -1..-20, flagging >= 95% of them
    # puts the threshold at -2; ID samples scoring <= -2 are flagged as OoD
    assert ood_metrics(np.array([0.0, -1.5, -2.0, -3.0]), -id_scores, positive="ood")["FPR95"] == 0.5


def test_hand_computed_auroc_and_average_precision_with_a_tie():
    # pairs (id, ood): (3,1) win, (3,2) win, (2,1) win, (2,2) tie -> (3 + 0.5) / 4
    metrics = ood_metrics(np.array([3.0, 2.0]), np.array([2.0, 1.0]))
    assert metrics["AUROC"] == pytest.approx(3.5 / 4)
    # ID positive: threshold 3 -> P=1, R=1/2; threshold 2 -> P=2/3, R=1 -> 1/2 + 1/2 * 2/3
    assert metrics["AUPR_IN"] == pytest.approx(0.5 + 1 / 3)
    # OoD positive on negated scores: threshold -1 -> P=1, R=1/2; threshold -2 -> P=2/3, R=1
    assert metrics["AUPR_OUT"] == pytest.approx(0.5 + 1 / 3)


def test_torch_and_integer_scores_are_accepted():
    expected = ood_metrics(np.array([3.0, 2.0, 5.0]), np.array([1.0, 2.0]))
    assert ood_metrics(torch.tensor([3, 2, 5]), torch.tensor([1.0, 2.0])) == expected


@pytest.mark.parametrize("positive", ["id", "ood"])
def test_roc_curve_matches_scikit_learn(positive):
    rng = np.random.default_rng(3)
    id_scores, ood_scores = np.round(rng.normal(1, 1, 80), 1), np.round(rng.normal(0, 1, 60), 1)
    scores = np.concatenate([id_scores, ood_scores])
    labels = np.concatenate([np.ones(80), np.zeros(60)])
    if positive == "ood":
        labels, scores = 1 - labels, -scores
    expected_fpr, expected_tpr, expected_thresholds = sk.roc_curve(labels, scores, drop_intermediate=False)
    fpr, tpr, thresholds = roc_curve(id_scores, ood_scores, positive=positive)
    np.testing.assert_allclose(fpr, expected_fpr)
    np.testing.assert_allclose(tpr, expected_tpr)
    np.testing.assert_allclose(thresholds[1:], expected_thresholds[1:])


def test_mean_metrics_averages_each_key():
    per_set = {"a": {"AUROC": 0.5, "AUPR_IN": 0.2, "AUPR_OUT": 0.4, "FPR95": 1.0},
               "b": {"AUROC": 1.0, "AUPR_IN": 0.4, "AUPR_OUT": 0.8, "FPR95": 0.0}}
    assert mean_metrics(per_set) == pytest.approx({"AUROC": 0.75, "AUPR_IN": 0.3, "AUPR_OUT": 0.6, "FPR95": 0.5})
    with pytest.raises(ValueError, match="at least one OoD set"):
        mean_metrics({})


@pytest.mark.parametrize(
    "id_scores, ood_scores, positive, message",
    [
        (np.array([1.0, np.nan]), np.array([0.0]), "id", r"id_scores has 1 non-finite values \(first at index 1\)"),
        (np.array([1.0]), np.array([np.inf]), "id", "ood_scores has 1 non-finite"),
        (np.array([]), np.array([0.0]), "id", "id_scores must be a non-empty 1-D array"),
        (np.ones((2, 2)), np.array([0.0]), "id", r"id_scores must be a non-empty 1-D array, got shape \(2, 2\)"),
        (np.array(["a"]), np.array([0.0]), "id", "id_scores must be numeric"),
        (np.array([1.0]), np.array([0.0]), "in", "positive='in' must be 'id' or 'ood'"),
    ],
)
def test_bad_input_raises_one_clear_error(id_scores, ood_scores, positive, message):
    with pytest.raises(ValueError, match=message):
        ood_metrics(id_scores, ood_scores, positive=positive)
