"""How the ablation judges one trained run: retrieval and geometry, OoD detection, and its learned sample weights."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmsphere.cache import build_feature_cache, cache_for, config_caches
from mmsphere.errors import MmsphereError
from mmsphere.train.config import Config
from mmsphere.data import build_eval_loader
from mmsphere.demo import weight_separation
from mmsphere.eval.evaluate import evaluate_retrieval_loader
from mmsphere.ood.evaluate import encode_image_set, id_accuracy, prompt_features
from mmsphere.ood.evaluate import evaluate_ood as evaluate_ood_sets
from mmsphere.ood.inputs import DEFAULT_TEMPLATES, is_folder
from mmsphere.ood.scores import NEEDS, OOD_SCORES
from mmsphere.train.preflight import local_shard_paths



@dataclasses.dataclass
class OodSets:
    """ID and OoD image sets (folders or image shards) and the ID class names of the zero-shot classifier.

    Without OoD sets only the ID accuracy (prompt classification) is measured.
    """

    id_images: str
    ood_images: dict[str, str]
    classes: list[str]
    templates: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_TEMPLATES))
    scores: tuple[str, ...] = ("mcm", "energy")
    positive: str = "id"  # FPR@95 convention (ARCHITECTURE.md, Evaluation conventions)
    negative_labels: list[str] | None = None  # negative label words, for the scores that need them (NegLabel)

    def check(self) -> None:
        """Raise naming the first impossible field; local folders and shards must exist."""
        # no OoD set: only the ID set's prompt-classification accuracy is measured
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise MmsphereError(f"OoD evaluation needs at least 2 distinct ID classes, got {self.classes}")
        unknown = [score for score in self.scores if score not in OOD_SCORES]
        if unknown or not self.scores:
            raise MmsphereError(f"OoD scores {unknown or '(none)'} are not available here; "
                                f"choose from {', '.join(OOD_SCORES)}")
        for score in self.scores:
            if "negative_features" in OOD_SCORES[score].needs and not self.negative_labels:
                raise MmsphereError(f"the {score} OoD score needs {NEEDS['negative_features']} (--neg-labels FILE)")
        if self.positive not in ("id", "ood"):
            raise MmsphereError(f"positive={self.positive!r} must be 'id' or 'ood'")
        for name, spec in [("id", self.id_images), *self.ood_images.items()]:
            if Path(spec).is_dir():
                continue
            try:
                paths = local_shard_paths(spec)
            except ValueError:  # a glob that matches no file
                paths = [spec]
            if paths is not None and not all(Path(path).is_file() for path in paths):
                raise FileNotFoundError(f"OoD image set {name}={spec!r} is neither a folder nor existing shards")


def evaluation_settings(ood: OodSets | None, mismatched_keys: set[str] | None) -> dict[str, Any]:
    """What a run's evaluation depended on besides its config (a saved result is reused only under the same)."""
    keys_digest = None
    if mismatched_keys:
        keys_digest = hashlib.sha256("\n".join(sorted(mismatched_keys)).encode()).hexdigest()
    settings = {"ood": None if ood is None else dataclasses.asdict(ood), "mismatched_keys_sha256": keys_digest}
    return json.loads(json.dumps(settings))  # as it reads back from the saved file (tuples become lists)


@torch.inference_mode()
def evaluate_model(model: torch.nn.Module, config: Config, *, ood: OodSets | None = None,
                   batch_size: int | None = None) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Flat metrics (``t2v/R@1``, ``geometry/...``, ``ood/<score>/<set>/AUROC``) and the per-sample OoD scores.

    With ``data.feature_cache`` the validation shards and image-shard OoD sets are read from (and, where
    missing, added to) the feature cache of the model's frozen trunks.
    """
    batch_size = batch_size or config.train.batch_size
    val_cache = config_caches(model, config)[1] if config.data.feature_cache else None
    if val_cache is not None:
        build_feature_cache(model, val_cache, config.data.val.urls, batch_size=batch_size, progress=False)
    metrics = evaluate_retrieval_loader(model, config.data.val.urls, modality=config.data.val.modality,
                                        frames=config.data.frames, batch_size=batch_size, progress=False,
                                        feature_cache=val_cache)
    metrics = {key: float(value) for key, value in metrics.items()}
    scores: dict[str, np.ndarray] = {}
    if ood is not None:
        ood_metrics_found, scores = evaluate_ood(model, ood, batch_size=batch_size, config=config)
        metrics.update(ood_metrics_found)
    return metrics, scores


def evaluate_ood(model: torch.nn.Module, ood: OodSets, *, batch_size: int,
                 config: Config | None = None) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """OoD metrics per score and set (and their mean over sets), plus the scores as ``{"<score>/<set>": [N]}``.

    Also ``ood/id_accuracy`` (prompt classification, %) when every ID image has a class: its folder,
    or for cached image shards its sample's ``group``.
    """
    # every image is encoded once, then scored by each score (at its default temperature)
    encoded = {name: _image_set(model, spec, name, batch_size, config)
               for name, spec in [("id", ood.id_images), *ood.ood_images.items()]}
    features = {name: values[0] for name, values in encoded.items()}
    metrics: dict[str, float] = {}
    scores: dict[str, np.ndarray] = {}
    for score in ood.scores if ood.ood_images else ():
        evaluation = evaluate_ood_sets(model, features["id"], {name: features[name] for name in ood.ood_images},
                                       ood.classes, ood.templates, score=score, positive=ood.positive,
                                       negative_labels=(ood.negative_labels
                                                        if "negative_features" in OOD_SCORES[score].needs else None))
        scores.update({f"{score}/{name}": values.scores for name, values in evaluation.per_sample.items()})
        for set_name, values in evaluation.metrics.items():
            metrics.update({f"ood/{score}/{set_name}/{key}": float(value) for key, value in values.items()})
    labels = encoded["id"][1]
    class_features = prompt_features(model, ood.classes, ood.templates)
    predicted = (features["id"] @ class_features.T).argmax(dim=1).tolist()
    accuracy = id_accuracy(labels, [ood.classes[index] for index in predicted], ood.classes)
    if accuracy is not None:
        metrics["ood/id_accuracy"] = float(accuracy)
    return metrics, scores


def _image_set(model: torch.nn.Module, spec: str, name: str, batch_size: int,
               config: Config | None) -> tuple[torch.Tensor, list[str | None]]:
    """Unit-norm features and classes of an image set; image shards from the feature cache when the config has one."""
    if config is None or not config.data.feature_cache or is_folder(spec):
        features, _, labels, _ = encode_image_set(model, spec, batch_size, 0, name)
        return features, labels
    # decoded as encode_image_set decodes: exactly, at the model's own input size
    cache = cache_for(model, config.data, "image", image_size=model.image_size, evaluation=True)
    build_feature_cache(model, cache, spec, batch_size=batch_size, progress=False, description=f"feature cache {name}")
    features, labels = [], []
    loader = build_eval_loader(spec, "image", frames=1, image_size=model.image_size, image_mean=model.image_mean,
                               image_std=model.image_std, batch_size=batch_size, feature_cache=cache)
    for batch in loader:
        features.append(model.encode_visual(**batch.media_inputs()).float().cpu())
        labels.extend(group if group != key else None for group, key in zip(batch.groups, batch.keys))
    if not features:
        raise MmsphereError(f"image set {name}={spec!r} produced no image (every sample was skipped)")
    return torch.cat(features), labels


def evaluate_weights(run_dir: str | os.PathLike, mismatched_keys: set[str]) -> dict[str, float]:
    """``weights/auroc_clean_vs_mismatched`` and the mean weights of a run's ``sample_weights.jsonl`` ({} if none)."""
    separation = weight_separation(Path(run_dir) / "sample_weights.jsonl", mismatched_keys)
    if separation is None:
        return {}
    return {f"weights/{key}": float(value) for key, value in separation.items() if key != "per_key"}


def read_mismatched_keys(path: str | os.PathLike) -> set[str]:
    """Keys of mismatched pairs from a demo ``meta.json`` (``mismatched_keys``), a JSON list or one key per line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mismatched-keys file {str(path)!r} does not exist")
    text = path.read_text()
    if path.suffix == ".json":
        try:
            content = json.loads(text)
        except json.JSONDecodeError as error:
            raise MmsphereError(f"{str(path)!r} is not valid JSON: {error}") from None
        keys = content.get("mismatched_keys") if isinstance(content, dict) else content
        if not isinstance(keys, list) or not all(isinstance(key, str) for key in keys):
            raise MmsphereError(f"{str(path)!r} must hold a list of keys or an object with 'mismatched_keys'")
        return set(keys)
    return {line.strip() for line in text.splitlines() if line.strip()}
