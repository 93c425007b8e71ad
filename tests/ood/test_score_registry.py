"""Adding an OoD score is one registered definition: it then runs through ``evaluate_ood`` like the shipped ones.

GEN (generalized entropy, Liu et al., CVPR 2023) and a toy score that needs negative labels are
registered here only, scored by the real entry point, and compared with loop transcriptions in
float64 written from the formulas (not from the library).
"""

from __future__ import annotations

import csv
import json
import math
import sys

import numpy as np
import pytest
import torch

from mmsphere.config import MmsphereError
from mmsphere.models import load_run
from mmsphere.ood import evaluate_ood
from mmsphere.ood.evaluate import prompt_features
from mmsphere.ood.cli import main as score_ood
from mmsphere.ood.scores import OOD_SCORES, OodScore, cosine_logits, on_logits, ood_score, register_ood_score
from tests.ood.test_metrics import sklearn_reference

CLASSES = ["red", "green", "blue", "black"]
TEMPLATES = ["a photo of a {}."]
GAMMA = 0.1


def gen_score(logits: torch.Tensor) -> torch.Tensor:
    """GEN: minus the generalized entropy ``Σ_j p_j^γ (1 − p_j)^γ`` of the softmax over all K classes."""
    probabilities = torch.softmax(logits, dim=1)
    return -(probabilities**GAMMA * (1 - probabilities) ** GAMMA).sum(dim=1)


def negative_margin(image_features, class_features, *, temperature, negative_features):
    """Toy score needing negative labels: best ID cosine minus best negative cosine, over T."""
    id_best = cosine_logits(image_features, class_features, temperature).amax(dim=1)
    return id_best - cosine_logits(image_features, negative_features, temperature).amax(dim=1)


@pytest.fixture
def registered():
    """GEN and the toy score in the registry for one test, then gone again."""
    register_ood_score(OodScore("gen", on_logits(gen_score), temperature=1.0, paper="GEN (Liu et al., CVPR 2023)"))
    register_ood_score(OodScore("negmargin", negative_margin, temperature=None, needs=("negative_features",)))
    yield
    OOD_SCORES.unregister("gen")
    OOD_SCORES.unregister("negmargin")


@pytest.fixture(scope="module")
def model(run_dir):
    return load_run(run_dir)


def unit_features(count: int, dim: int, seed: int) -> torch.Tensor:
    features = torch.randn(count, dim, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.normalize(features, dim=1)


def rows(matrix) -> list[list[float]]:
    return [[float(value) for value in row] for row in np.asarray(matrix, dtype=np.float64)]


def cosines(images, classes) -> list[list[float]]:
    return [[sum(a * b for a, b in zip(image, row)) for row in rows(classes)] for image in rows(images)]


def gen_reference(images, classes, temperature: float) -> list[float]:
    expected = []
    for row in cosines(images, classes):
        exponentials = [math.exp(value / temperature) for value in row]
        total = sum(exponentials)
        expected.append(-sum((e / total) ** GAMMA * (1 - e / total) ** GAMMA for e in exponentials))
    return expected


def test_a_score_registered_in_a_test_runs_through_evaluate_ood(model, registered):
    dim = model.embed_dim
    id_features = unit_features(24, dim, seed=0)
    ood_sets = {"near": unit_features(20, dim, seed=1)}
    evaluation = evaluate_ood(model, id_features, ood_sets, CLASSES, TEMPLATES, score="gen")

    assert evaluation.score == "gen" and evaluation.temperature == 1.0  # the registered temperature
    class_features = prompt_features(model, CLASSES, TEMPLATES)
    for name, features in [("id", id_features), ("near", ood_sets["near"])]:
        np.testing.assert_allclose(evaluation.per_sample[name].scores,
                                   gen_reference(features, class_features, 1.0), rtol=1e-9)
    assert evaluation.metrics["near"] == pytest.approx(
        sklearn_reference(evaluation.per_sample["id"].scores, evaluation.per_sample["near"].scores, "id"))


def test_a_registered_score_that_needs_negative_labels_gets_them(model, registered):
    dim = model.embed_dim
    id_features, ood_features = unit_features(16, dim, seed=3), unit_features(12, dim, seed=4)
    negatives = ["purple", "orange"]
    evaluation = evaluate_ood(model, id_features, {"far": ood_features}, CLASSES, TEMPLATES, score="negmargin",
                              negative_labels=negatives)

    temperature = 1.0 / float(model.log_logit_scale.detach().exp())  # registered with temperature=None
    assert evaluation.temperature == pytest.approx(temperature) and evaluation.negative_labels == negatives
    class_features = prompt_features(model, CLASSES, TEMPLATES)
    negative_features = prompt_features(model, negatives, TEMPLATES)
    for name, features in [("id", id_features), ("far", ood_features)]:
        expected = [(max(id_row) - max(negative_row)) / temperature for id_row, negative_row in
                    zip(cosines(features, class_features), cosines(features, negative_features))]
        np.testing.assert_allclose(evaluation.per_sample[name].scores, expected, rtol=1e-9)

    with pytest.raises(MmsphereError, match="the negmargin score needs negative labels"):
        evaluate_ood(model, id_features, {"far": ood_features}, CLASSES, TEMPLATES, score="negmargin")
    with pytest.raises(MmsphereError, match="only used by the neglabel or negmargin score, not by 'gen'"):
        evaluate_ood(model, id_features, {"far": ood_features}, CLASSES, TEMPLATES, score="gen",
                     negative_labels=negatives)


def test_a_score_is_known_only_while_registered(registered):
    images, classes = unit_features(3, 8, seed=5), unit_features(2, 8, seed=6)
    assert {"mcm", "msp", "maxlogit", "energy", "neglabel", "gen", "negmargin"} <= set(OOD_SCORES)
    OOD_SCORES.unregister("gen")
    with pytest.raises(ValueError, match="score 'gen' is unknown"):
        ood_score("gen", images, classes, temperature=1.0)


def test_a_taken_name_or_an_unknown_need_is_refused():
    with pytest.raises(ValueError, match="a score named 'mcm' is already registered"):
        register_ood_score(OodScore("mcm", on_logits(gen_score), temperature=1.0))
    with pytest.raises(ValueError, match="needs \\['text_features'\\] must be among"):
        OodScore("odd", on_logits(gen_score), temperature=1.0, needs=("text_features",))


@pytest.mark.parametrize("name", sorted(OOD_SCORES))
def test_every_registered_score_gives_one_finite_value_per_image(name):
    images, classes, negatives = unit_features(5, 8, seed=7), unit_features(3, 8, seed=8), unit_features(2, 8, seed=9)
    extras = {"negative_features": negatives} if "negative_features" in OOD_SCORES[name].needs else {}
    scores = ood_score(name, images, classes, temperature=0.5, **extras)
    assert scores.shape == (5,) and torch.isfinite(scores).all()


MY_SCORES = """
import torch
from mmsphere.ood import OodScore, on_logits, register_ood_score

def gen(logits):
    probabilities = torch.softmax(logits, dim=1)
    return -(probabilities**0.1 * (1 - probabilities) ** 0.1).sum(dim=1)

register_ood_score(OodScore("my-gen", on_logits(gen), temperature=1.0))
"""


def test_score_ood_takes_a_score_registered_by_an_imported_module(run_dir, image_sets, tmp_path, monkeypatch):
    (tmp_path / "my_scores.py").write_text(MY_SCORES)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "ood.json"
    try:
        code = score_ood(["--run", str(run_dir), "--id", image_sets["id"], "--ood", f"flat={image_sets['flat']}",
                          "--classes", image_sets["classes"], "--imports", "my_scores", "--score", "my-gen",
                          "--out", str(out)])
        assert code == 0
        assert json.loads(out.read_text())["score"] == "my-gen"
        with open(tmp_path / "ood.scores.csv", newline="") as handle:
            printed = [float(row["score"]) for row in csv.DictReader(handle)]
        library = evaluate_ood(load_run(run_dir), image_sets["id"], {"flat": image_sets["flat"]},
                               image_sets["classes"], score="my-gen")
        assert printed == pytest.approx([*library.per_sample["id"].scores, *library.per_sample["flat"].scores])
    finally:
        OOD_SCORES.unregister("my-gen")
        sys.modules.pop("my_scores", None)
