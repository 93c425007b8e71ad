"""The OoD library entry: ``evaluate_ood(model, id_data, ood_sets, class_names, templates, ...)``.

Everything ``mmsphere score-ood`` computes, callable from Python: zero-shot class prompts, image
features (from image folders, image shards or already-encoded tensors), per-sample scores and the
metrics per OoD set and their mean. The temperature rule lives here and nowhere else.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from mmsphere.config import MmsphereError
from mmsphere.data.stats import skipped_counts
from mmsphere.eval.encode import encode_texts
from mmsphere.ood.inputs import image_batches, read_names, read_templates
from mmsphere.ood.metrics import CONVENTIONS, mean_metrics, ood_metrics
from mmsphere.ood.scores import DEFAULT_TEMPERATURE, SCORES, cosine_logits, ood_score

logger = logging.getLogger(__name__)

# an image folder, image shard URLs, or unit-norm image features [N, D]
ImageSet = Union[str, os.PathLike, torch.Tensor, np.ndarray]
# names given directly, or a file of names one per line
Names = Union[Sequence[str], str, os.PathLike]
RESERVED_SET_NAMES = ("id", "mean")


@dataclass
class SetScores:
    """One image set's per-sample results: identifiers, folder classes, scores and zero-shot predictions."""

    spec: str | None  # the folder or shard URLs it was read from; None for features given as a tensor
    names: list[str]  # file paths, shard sample keys, or row indices of a feature tensor
    labels: list[str | None]  # the class sub-folder of each image, None where there is none
    scores: np.ndarray  # [N], higher = more in-distribution
    predicted: list[str]  # the zero-shot class of each image
    skipped: dict[str, int] = field(default_factory=dict)  # undecodable samples by reason


@dataclass
class OodEvaluation:
    """What :func:`evaluate_ood` returns: the settings, metrics per OoD set and ``"mean"``, and per-sample scores."""

    score: str
    temperature: float
    positive: str
    metrics: dict[str, dict[str, float]]
    per_sample: dict[str, SetScores]  # "id" first, then the OoD sets in the order given
    classes: list[str]
    templates: list[str]
    negative_labels: list[str] | None
    id_accuracy: float | None  # zero-shot top-1 on the ID set when its folders are named after the classes

    @property
    def convention(self) -> str:
        """The FPR@95 / AUPR convention of these metrics, in words."""
        return CONVENTIONS[self.positive]


@dataclass
class OodPrompts:
    """Checked class names, prompt templates and negative labels of one OoD evaluation."""

    classes: list[str]
    templates: list[str]
    negative_labels: list[str] | None


def evaluate_ood(
    model: Any,
    id_data: ImageSet,
    ood_sets: Mapping[str, ImageSet],
    class_names: Names,
    templates: Names | None = None,
    *,
    score: str = "mcm",
    temperature: float | None = None,
    positive: str = "id",
    negative_labels: Names | None = None,
    batch_size: int = 64,
    workers: int = 0,
) -> OodEvaluation:
    """Zero-shot OoD detection of ``ood_sets`` against ``id_data`` (MCM, NeurIPS 2022, and the other ``SCORES``).

    Image sets are folders, image shard URLs or unit-norm features ``[N, D]``; names are lists or
    files of one name per line; ``temperature=None`` applies :func:`default_temperature`.
    """
    if score not in SCORES:
        raise ValueError(f"score {score!r} is unknown; choose one of {', '.join(SCORES)}")
    if positive not in CONVENTIONS:
        raise ValueError(f"positive={positive!r} must be 'id' or 'ood'")
    check_set_names(ood_sets)
    prompts = read_prompts(class_names, templates, negative_labels, score)
    temperature = default_temperature(score, temperature, float(model.log_logit_scale.detach().exp()))

    class_features = prompt_features(model, prompts.classes, prompts.templates)
    negative_features = (prompt_features(model, prompts.negative_labels, prompts.templates)
                         if prompts.negative_labels else None)
    per_sample: dict[str, SetScores] = {}
    for name, data in [("id", id_data), *ood_sets.items()]:
        features, spec, sample_names, labels, skipped = image_set_features(model, data, name, batch_size, workers)
        scores = ood_score(score, features, class_features, temperature=temperature,
                           negative_features=negative_features)
        predicted = cosine_logits(features, class_features, 1.0).argmax(dim=1)
        per_sample[name] = SetScores(spec, sample_names, labels, scores.numpy(),
                                     [prompts.classes[index] for index in predicted.tolist()], skipped)

    per_set = {name: ood_metrics(per_sample["id"].scores, values.scores, positive=positive)
               for name, values in per_sample.items() if name != "id"}
    return OodEvaluation(
        score=score, temperature=temperature, positive=positive, metrics={**per_set, "mean": mean_metrics(per_set)},
        per_sample=per_sample, classes=prompts.classes, templates=prompts.templates,
        negative_labels=prompts.negative_labels,
        id_accuracy=id_accuracy(per_sample["id"].labels, per_sample["id"].predicted, prompts.classes),
    )


def default_temperature(score: str, temperature: float | None, logit_scale: float) -> float:
    """``temperature`` if given, else the paper's (1 for MCM, 0.01 for NegLabel), else ``1 / logit_scale``.

    ``1 / logit_scale`` makes msp, maxlogit and energy use the model's own zero-shot classifier.
    """
    if temperature is not None:
        if not temperature > 0:
            raise ValueError(f"temperature={temperature} must be > 0")
        return float(temperature)
    return DEFAULT_TEMPERATURE[score] or 1.0 / logit_scale


def check_set_names(ood_sets: Mapping[str, Any]) -> None:
    """OoD set names are non-empty strings other than the reserved 'id' and 'mean'; at least one set."""
    if not ood_sets:
        raise ValueError("ood_sets is empty; give at least one OoD image set")
    for name in ood_sets:
        if not isinstance(name, str) or not name:
            raise ValueError(f"OoD set name {name!r} must be a non-empty string")
        if name in RESERVED_SET_NAMES:
            raise MmsphereError(f"OoD set name {name!r} is reserved; choose another name")


def read_prompts(class_names: Names, templates: Names | None, negative_labels: Names | None,
                 score: str) -> OodPrompts:
    """Class names, templates and negative labels from lists or files, checked against each other and the score."""
    classes = _names(class_names, "classes")
    if templates is None or isinstance(templates, (str, os.PathLike)):
        template_list = read_templates(templates)
    else:
        template_list = _names(templates, "templates")
        for template in template_list:
            if template.count("{}") != 1:
                raise MmsphereError(f"template {template!r} must hold exactly one '{{}}' where the class name goes")
    negatives = None
    if negative_labels is not None:
        if score != "neglabel":
            raise MmsphereError(f"negative labels are only used by the neglabel score, not by {score!r}")
        negatives = _names(negative_labels, "negative labels")
        shared = sorted(set(negatives) & set(classes))
        if shared:
            where = f" in {str(class_names)!r}" if isinstance(class_names, (str, os.PathLike)) else ""
            raise MmsphereError(f"negative labels {shared} are also ID classes{where}")
    elif score == "neglabel":
        raise MmsphereError("the neglabel score needs negative labels (a list, or a file of one label per line)")
    return OodPrompts(classes, template_list, negatives)


def _names(names: Names, what: str) -> list[str]:
    if isinstance(names, (str, os.PathLike)):
        return read_names(names, what)
    names = [str(name).strip() for name in names]
    if not names:
        raise MmsphereError(f"{what} is empty")
    if any(not name for name in names):
        raise MmsphereError(f"{what} holds a blank name")
    if len(set(names)) != len(names):
        raise MmsphereError(f"{what} lists {sorted({name for name in names if names.count(name) > 1})} twice")
    return names


def image_set_features(model: Any, data: ImageSet, set_name: str, batch_size: int,
                       workers: int) -> tuple[torch.Tensor, str | None, list[str], list[str | None], dict[str, int]]:
    """Features, spec, sample names, folder classes and skip counts of an image set or of given features."""
    if isinstance(data, (torch.Tensor, np.ndarray)):
        features = torch.as_tensor(data).detach().cpu()
        if features.ndim != 2 or features.shape[0] == 0:
            raise ValueError(f"features of image set {set_name!r} must be a non-empty [N, D] matrix, "
                             f"got shape {tuple(features.shape)}")
        return features, None, [str(index) for index in range(features.shape[0])], [None] * features.shape[0], {}
    spec = str(data)
    features, names, labels, skipped = encode_image_set(model, spec, batch_size, workers, set_name)
    return features, spec, names, labels, skipped


@torch.inference_mode()
def prompt_features(model: Any, names: list[str], templates: list[str]) -> torch.Tensor:
    """Zero-shot class embeddings (CLIP prompt ensembling): mean of the unit-norm template embeddings, renormalised."""
    prompts = [template.format(name) for name in names for template in templates]
    features = encode_texts(model, prompts).view(len(names), len(templates), -1).mean(dim=1)
    return torch.nn.functional.normalize(features, dim=1)


@torch.inference_mode()
def encode_image_set(model: Any, spec: str, batch_size: int, workers: int,
                     set_name: str) -> tuple[torch.Tensor, list[str], list[str | None], dict[str, int]]:
    """Unit-norm features, sample names, folder classes and skip counts of an image folder or image shards."""
    device = next(model.parameters()).device
    skipped: dict[str, int] = {}
    before = skipped_counts()
    features, names, labels = [], [], []
    batches = image_batches(spec, image_size=model.image_size, image_mean=model.image_mean,
                            image_std=model.image_std, batch_size=batch_size, workers=workers, skipped=skipped)
    for batch in tqdm(batches, desc=f"encoding {set_name}", unit="batch"):
        batch_features = model.encode_image(batch.images.to(device)).float().cpu()
        finite = torch.isfinite(batch_features).all(dim=1)
        if not finite.all():
            raise MmsphereError(f"the model produced non-finite features for {batch.names[int(torch.nonzero(~finite)[0])]!r}"
                                "; its weights may hold NaN/Inf")
        features.append(batch_features)
        names.extend(batch.names)
        labels.extend(batch.classes)
    for reason, count in skipped_counts().items():
        if count - before.get(reason, 0):
            skipped[reason] = skipped.get(reason, 0) + count - before.get(reason, 0)
    if not features:
        raise MmsphereError(f"image set {set_name}={spec!r} produced no image (every sample was skipped: {skipped})")
    return torch.cat(features), names, labels, skipped


def id_accuracy(labels: list[str | None], predicted: list[str], classes: list[str]) -> float | None:
    """Zero-shot top-1 accuracy on the ID set when its folders are named after the classes, else None."""
    if any(label is None or label not in classes for label in labels):
        return None
    return float(np.mean([label == guess for label, guess in zip(labels, predicted)]))

