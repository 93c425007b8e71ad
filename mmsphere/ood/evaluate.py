"""The OoD library entry: ``evaluate_ood(model, id_data, ood_sets, class_names, templates, ...)``.

Everything ``mmsphere score-ood`` computes, callable from Python: zero-shot class prompts, image
features (from image folders, image lists, image shards or already-encoded tensors), per-sample scores
and the metrics per OoD set and their mean (and per role: near / far). The temperature rule lives
here and nowhere else. A set that loses images (missing, empty or undecodable files, a shard's
skipped samples) stops the evaluation before any metric unless ``allow_missing``; then every set
records n listed / n evaluated and what is missing.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from mmsphere.config import MmsphereError
from mmsphere.data.stats import skipped_counts
from mmsphere.eval.completeness import (
    ALLOW_FLAG,
    IncompleteDataError,
    MissingItem,
    SHOWN_NAMES,
    lost_samples,
    media_fingerprint,
    refuse_incomplete,
    shard_fingerprint,
    write_missing,
)
from mmsphere.eval.encode import encode_texts
from mmsphere.ood.inputs import (
    ImageFiles,
    image_batches,
    image_files,
    is_folder,
    is_list_file,
    read_names,
    read_templates,
)
from mmsphere.ood.metrics import CONVENTIONS, mean_metrics, ood_metrics
from mmsphere.ood.scores import NEEDS, OOD_SCORES, cosine_logits, ood_score, scores_needing

logger = logging.getLogger(__name__)

# an image folder, an image list (.txt), image shard URLs, files found already, or unit-norm features [N, D]
ImageSet = Union[str, os.PathLike, ImageFiles, torch.Tensor, np.ndarray]
# names given directly, or a file of names one per line
Names = Union[Sequence[str], str, os.PathLike]
RESERVED_SET_NAMES = ("id", "mean")
OOD_ROLES = ("near", "far", "ood")  # "ood": a set given without a role


@dataclass
class SetScores:
    """One image set's per-sample results: identifiers, folder classes, scores and zero-shot predictions."""

    spec: str | None  # the folder or shard URLs it was read from; None for features given as a tensor
    names: list[str]  # file paths, shard sample keys, or row indices of a feature tensor
    labels: list[str | None]  # the class sub-folder of each image, None where there is none
    scores: np.ndarray  # [N], higher = more in-distribution
    predicted: list[str]  # the zero-shot class of each image
    skipped: dict[str, int] = field(default_factory=dict)  # undecodable samples by reason
    role: str = "ood"  # "id", or the OoD set's role: "near", "far" or "ood" (none given)
    completeness: dict[str, Any] = field(default_factory=dict)  # n_listed, n_evaluated, subset, missing
    media: dict[str, Any] | None = None  # fingerprint of the files evaluated (None for given features)


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
    group_means: dict[str, dict[str, float]] = field(default_factory=dict)  # mean per role ("near", "far")

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
    allow_missing: bool = False,
    missing_file: str | os.PathLike | None = None,
    roles: Mapping[str, str] | None = None,
) -> OodEvaluation:
    """Zero-shot OoD detection of ``ood_sets`` against ``id_data`` (MCM, NeurIPS 2022, or any score of ``OOD_SCORES``).

    Image sets are folders, image lists, image shard URLs, :class:`ImageFiles` or unit-norm features
    ``[N, D]``; names are lists or files of one name per line; ``temperature=None`` applies
    :func:`default_temperature`. A set that loses images stops the evaluation (before encoding when a
    file is missing, before scoring when one does not decode) unless ``allow_missing``;
    ``missing_file`` receives their names. ``roles`` (``near``/``far`` per OoD set) adds a mean per role.
    """
    OOD_SCORES.lookup(score)
    if positive not in CONVENTIONS:
        raise ValueError(f"positive={positive!r} must be 'id' or 'ood'")
    check_set_names(ood_sets)
    roles = dict(roles or {})
    unknown = {name: role for name, role in roles.items() if name not in ood_sets or role not in OOD_ROLES}
    if unknown:
        raise ValueError(f"roles {unknown} must name OoD sets and be one of {OOD_ROLES}")
    prompts = read_prompts(class_names, templates, negative_labels, score)
    temperature = default_temperature(score, temperature, float(model.log_logit_scale.detach().exp()))

    # every file of every folder or list is looked up before anything is encoded
    sources = {name: _found_files(data) for name, data in [("id", id_data), *ood_sets.items()]}
    missing = {name: [_in_set(item, name) for item in source.missing] if isinstance(source, ImageFiles) else []
               for name, source in sources.items()}
    refuse_incomplete([item for items in missing.values() for item in items],
                      sum(source.listed for source in sources.values() if isinstance(source, ImageFiles)),
                      "images of the ID and OoD sets", allow_missing=allow_missing, missing_file=missing_file)

    class_features = prompt_features(model, prompts.classes, prompts.templates)
    # what the score needs besides the class features, encoded once for every set
    needed = {"negative_features": prompt_features(model, prompts.negative_labels, prompts.templates)
              if prompts.negative_labels else None}
    per_sample: dict[str, SetScores] = {}
    for name, data in sources.items():
        encoded = image_set_features(model, data, name, batch_size, workers)
        missing[name] += [_in_set(item, name) for item in encoded.failed]
        listed = data.listed if isinstance(data, ImageFiles) else len(encoded.names) + sum(encoded.lost.values())
        if (missing[name] or encoded.lost) and not allow_missing:
            _refuse_lost(name, missing[name], encoded.lost, listed, missing_file)
        scores = ood_score(score, encoded.features, class_features, temperature=temperature, **needed)
        predicted = cosine_logits(encoded.features, class_features, 1.0).argmax(dim=1)
        per_sample[name] = SetScores(encoded.spec, encoded.names, encoded.labels, scores.numpy(),
                                     [prompts.classes[index] for index in predicted.tolist()], encoded.skipped,
                                     role="id" if name == "id" else roles.get(name, "ood"),
                                     completeness=_set_completeness(listed, len(encoded.names), missing[name],
                                                                    encoded.lost, missing_file),
                                     media=encoded.media)
    every_missing = [item for items in missing.values() for item in items]
    if every_missing and missing_file is not None:
        write_missing(missing_file, every_missing)

    per_set = {name: ood_metrics(per_sample["id"].scores, values.scores, positive=positive)
               for name, values in per_sample.items() if name != "id"}
    by_role: dict[str, dict[str, dict[str, float]]] = {}
    for name, metrics in per_set.items():
        by_role.setdefault(per_sample[name].role, {})[name] = metrics
    group_means = {role: mean_metrics(sets) for role, sets in by_role.items()} if roles else {}
    return OodEvaluation(
        score=score, temperature=temperature, positive=positive, metrics={**per_set, "mean": mean_metrics(per_set)},
        per_sample=per_sample, classes=prompts.classes, templates=prompts.templates,
        negative_labels=prompts.negative_labels,
        id_accuracy=id_accuracy(per_sample["id"].labels, per_sample["id"].predicted, prompts.classes),
        group_means=group_means,
    )


def default_temperature(score: str, temperature: float | None, logit_scale: float) -> float:
    """``temperature`` if given, else the score's own (1 for MCM, 0.01 for NegLabel), else ``1 / logit_scale``.

    ``1 / logit_scale`` (a score registered with ``temperature=None``: msp, maxlogit, energy) makes the
    score use the model's own zero-shot classifier.
    """
    if temperature is not None:
        if not temperature > 0:
            raise ValueError(f"temperature={temperature} must be > 0")
        return float(temperature)
    own = OOD_SCORES.lookup(score).temperature
    return own if own is not None else 1.0 / logit_scale


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
    needs_negatives = "negative_features" in OOD_SCORES.lookup(score).needs
    if negative_labels is not None:
        if not needs_negatives:
            raise MmsphereError(f"{NEEDS['negative_features']} are only used by the "
                                f"{scores_needing('negative_features')} score, not by {score!r}")
        negatives = _names(negative_labels, "negative labels")
        shared = sorted(set(negatives) & set(classes))
        if shared:
            where = f" in {str(class_names)!r}" if isinstance(class_names, (str, os.PathLike)) else ""
            raise MmsphereError(f"negative labels {shared} are also ID classes{where}")
    elif needs_negatives:
        raise MmsphereError(f"the {score} score needs negative labels (a list, or a file of one label per line)")
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


@dataclass
class EncodedImages:
    """One image set encoded: features and, per image, name and folder class; what was skipped or lost."""

    features: torch.Tensor  # [N, D] unit-norm, float32, CPU
    spec: str | None
    names: list[str]
    labels: list[str | None]
    skipped: dict[str, int]  # by reason: undecodable files, a shard's skipped samples
    failed: list[MissingItem] = field(default_factory=list)  # files of a folder or list that did not decode
    lost: dict[str, int] = field(default_factory=dict)  # a shard's samples lost, by reason (no names)
    media: dict[str, Any] | None = None  # fingerprint of the files evaluated


def image_set_features(model: Any, data: ImageSet, set_name: str, batch_size: int, workers: int) -> EncodedImages:
    """An image set encoded (a folder, list, shards or :class:`ImageFiles`), or given features checked."""
    if isinstance(data, (torch.Tensor, np.ndarray)):
        features = torch.as_tensor(data).detach().cpu()
        if features.ndim != 2 or features.shape[0] == 0:
            raise ValueError(f"features of image set {set_name!r} must be a non-empty [N, D] matrix, "
                             f"got shape {tuple(features.shape)}")
        count = features.shape[0]
        return EncodedImages(features, None, [str(index) for index in range(count)], [None] * count, {})
    return encode_images(model, data, batch_size, workers, set_name)


@torch.inference_mode()
def prompt_features(model: Any, names: list[str], templates: list[str]) -> torch.Tensor:
    """Zero-shot class embeddings (CLIP prompt ensembling): mean of the unit-norm template embeddings, renormalised."""
    prompts = [template.format(name) for name in names for template in templates]
    features = encode_texts(model, prompts).view(len(names), len(templates), -1).mean(dim=1)
    return torch.nn.functional.normalize(features, dim=1)


def encode_image_set(model: Any, spec: str, batch_size: int, workers: int,
                     set_name: str) -> tuple[torch.Tensor, list[str], list[str | None], dict[str, int]]:
    """Unit-norm features, sample names, folder classes and skip counts of an image folder or image shards."""
    encoded = encode_images(model, spec, batch_size, workers, set_name)
    return encoded.features, encoded.names, encoded.labels, encoded.skipped


@torch.inference_mode()
def encode_images(model: Any, source: str | ImageFiles, batch_size: int, workers: int, set_name: str) -> EncodedImages:
    """Encode an image folder, list, shards or :class:`ImageFiles`; undecodable images are recorded, not raised."""
    device = next(model.parameters()).device
    skipped: dict[str, int] = {}
    failed: list[MissingItem] = []
    before = skipped_counts()
    features, names, labels = [], [], []
    spec = source.spec if isinstance(source, ImageFiles) else str(source)
    batches = image_batches(source, image_size=model.image_size, image_mean=model.image_mean,
                            image_std=model.image_std, batch_size=batch_size, workers=workers, skipped=skipped,
                            failed=failed)
    for batch in tqdm(batches, desc=f"encoding {set_name}", unit="batch"):
        batch_features = model.encode_image(batch.images.to(device)).float().cpu()
        finite = torch.isfinite(batch_features).all(dim=1)
        if not finite.all():
            raise MmsphereError(f"the model produced non-finite features for {batch.names[int(torch.nonzero(~finite)[0])]!r}"
                                "; its weights may hold NaN/Inf")
        features.append(batch_features)
        names.extend(batch.names)
        labels.extend(batch.classes)
    shard_skips = {reason: count - before.get(reason, 0) for reason, count in skipped_counts().items()
                   if count - before.get(reason, 0)}
    for reason, count in shard_skips.items():
        skipped[reason] = skipped.get(reason, 0) + count
    if not features:
        raise MmsphereError(f"image set {set_name}={spec!r} produced no image (every sample was skipped: {skipped})")
    if isinstance(source, ImageFiles) or is_folder(spec) or is_list_file(spec):
        root = spec if is_folder(spec) else None
        media = media_fingerprint([(name, Path(name)) for name in names], root)
    else:
        media = shard_fingerprint(spec)
    return EncodedImages(torch.cat(features), spec, names, labels, skipped, failed, lost_samples(shard_skips), media)


def _found_files(data: ImageSet) -> ImageSet:
    """A folder or list given by name becomes its :class:`ImageFiles` (every file looked up); others stay."""
    if isinstance(data, (str, os.PathLike)) and (is_folder(str(data)) or is_list_file(str(data))):
        return image_files(str(data))
    return data


def _in_set(item: MissingItem, set_name: str) -> MissingItem:
    return MissingItem(f"{set_name}: {item.name}", item.reason, item.detail)


def _refuse_lost(name: str, items: list[MissingItem], lost: dict[str, int], listed: int,
                 missing_file: str | os.PathLike | None) -> None:
    """Stop before scoring: set ``name`` lost images while encoding (named, or counted for shards)."""
    if items:
        refuse_incomplete(items, listed, f"images of set {name}", allow_missing=False, missing_file=missing_file,
                          stage="before scoring (found while decoding)")
    raise IncompleteDataError(
        f"{sum(lost.values())} of {listed} samples of set {name} were lost while reading its shards ({lost}), "
        f"stopped before scoring (the log names the first ones); repair them, or pass {ALLOW_FLAG} to evaluate "
        "the rest (every output then says it is a subset)")


def _set_completeness(listed: int, evaluated: int, items: list[MissingItem], lost: dict[str, int],
                      missing_file: str | os.PathLike | None) -> dict[str, Any]:
    """n listed / n evaluated of one set, and what is missing: named files, or a shard's counts by reason."""
    record: dict[str, Any] = {"n_listed": listed, "n_evaluated": evaluated, "subset": evaluated < listed}
    count = len(items) + sum(lost.values())
    if count:
        by_reason = dict(Counter(item.reason for item in items))
        for reason, lost_count in lost.items():
            by_reason[reason] = by_reason.get(reason, 0) + lost_count
        record["missing"] = {"count": count, "by_reason": by_reason,
                             "first": [item.name for item in items[:SHOWN_NAMES]],
                             "file": str(missing_file) if items and missing_file is not None else None}
    return record


def id_accuracy(labels: list[str | None], predicted: list[str], classes: list[str]) -> float | None:
    """Zero-shot top-1 accuracy on the ID set when its folders are named after the classes, else None.

    A folder ``aquarium_fish`` names the class ``aquarium fish`` (exports of CIFAR-100 keep the underscores).
    """
    known = set(classes)
    named = [label if label in known or label is None else label.replace("_", " ") for label in labels]
    if any(label is None or label not in known for label in named):
        return None
    return float(np.mean([label == guess for label, guess in zip(named, predicted)]))

