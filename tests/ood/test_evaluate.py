"""``evaluate_ood`` from Python on already-encoded features, against scikit-learn on the same scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmsphere.config import MmsphereError
from mmsphere.models import load_run
from mmsphere.ood import evaluate_ood, ood_score
from mmsphere.ood.evaluate import prompt_features
from tests.ood.test_metrics import sklearn_reference

CLASSES = ["red", "green", "blue"]
TEMPLATES = ["a photo of a {}.", "a {} thing"]


@pytest.fixture(scope="module")
def model(run_dir):
    return load_run(run_dir)


def unit_features(count: int, dim: int, seed: int) -> torch.Tensor:
    features = torch.randn(count, dim, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.normalize(features, dim=1)


@pytest.mark.parametrize("score", ["mcm", "energy", "maxlogit"])
@pytest.mark.parametrize("positive", ["id", "ood"])
def test_metrics_match_scikit_learn_on_the_same_scores(model, score, positive):
    dim = model.embed_dim
    id_features = unit_features(40, dim, seed=0)
    ood_sets = {"near": unit_features(30, dim, seed=1), "far": unit_features(25, dim, seed=2).numpy()}
    evaluation = evaluate_ood(model, id_features, ood_sets, CLASSES, TEMPLATES, score=score, positive=positive)

    logit_scale = float(model.log_logit_scale.detach().exp())
    expected_temperature = 1.0 if score == "mcm" else 1.0 / logit_scale
    assert evaluation.temperature == pytest.approx(expected_temperature)
    assert list(evaluation.per_sample) == ["id", "near", "far"]
    class_features = prompt_features(model, CLASSES, TEMPLATES)
    for name, features in [("id", id_features), *ood_sets.items()]:
        expected = ood_score(score, features, class_features, temperature=expected_temperature).numpy()
        np.testing.assert_allclose(evaluation.per_sample[name].scores, expected, rtol=1e-12)
        assert evaluation.per_sample[name].spec is None and len(evaluation.per_sample[name].names) == len(features)

    id_scores = evaluation.per_sample["id"].scores
    for name in ood_sets:
        reference = sklearn_reference(id_scores, evaluation.per_sample[name].scores, positive)
        assert evaluation.metrics[name] == pytest.approx(reference)
    for key in ("AUROC", "AUPR_IN", "AUPR_OUT", "FPR95"):
        assert evaluation.metrics["mean"][key] == pytest.approx(
            (evaluation.metrics["near"][key] + evaluation.metrics["far"][key]) / 2)
    assert evaluation.id_accuracy is None  # tensors carry no folder classes
    assert evaluation.convention.startswith("higher score = more in-distribution")


def test_an_explicit_temperature_and_negative_labels(model):
    dim = model.embed_dim
    evaluation = evaluate_ood(model, unit_features(10, dim, 3), {"other": unit_features(12, dim, 4)}, CLASSES,
                              score="neglabel", negative_labels=["black", "white"])
    assert evaluation.temperature == 0.01 and evaluation.negative_labels == ["black", "white"]
    assert evaluation.templates == ["a photo of a {}."]
    assert evaluate_ood(model, unit_features(10, dim, 3), {"other": unit_features(12, dim, 4)}, CLASSES,
                        score="msp", temperature=0.5).temperature == 0.5


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"ood_sets": {"id": None}}, "reserved"),
        ({"ood_sets": {}}, "ood_sets is empty"),
        ({"score": "neglabel"}, "needs negative labels"),
        ({"negative_labels": ["black"]}, "only used by the neglabel score"),
        ({"score": "neglabel", "negative_labels": ["red"]}, "negative labels ['red'] are also ID classes"),
        ({"temperature": 0.0}, "temperature=0.0 must be > 0"),
        ({"templates": ["a photo"]}, "exactly one '{}'"),
        ({"class_names": ["red", "red"]}, "twice"),
        ({"id_data": torch.zeros(0, 4)}, "non-empty [N, D]"),
    ],
)
def test_bad_input_raises_one_clear_error(model, kwargs, message):
    arguments = {"id_data": unit_features(5, model.embed_dim, 5),
                 "ood_sets": {"other": unit_features(5, model.embed_dim, 6)}, "class_names": CLASSES}
    arguments.update(kwargs)
    with pytest.raises((MmsphereError, ValueError)) as error:
        evaluate_ood(model, **arguments)
    assert message in str(error.value)
