"""Weights of a frozen-tower run: the trained tensors only, plus a reference to the frozen base they sit on.

A run whose towers are frozen (``model.trainable: heads``, ``model.freeze_image``, ``model.freeze_text``)
never changes them, so its checkpoints and run directory need not hold them again: when the frozen
base comes from a source that rebuilds it (``model.pretrained``: a tag, a file, a directory or an
hf-hub name), the weights file holds only the tensors training may change, and a *reference* records
the source, the model config and a digest of the frozen tensors (:func:`mmsphere.digest.tensors_sha256`
over :meth:`DualEncoder.frozen_state_names`: by content, so a re-saved identical base still matches).
Loading rebuilds the base with :func:`create_model`, checks the digest, then loads the trained tensors
on top. A randomly initialised base (no ``model.pretrained``) cannot be rebuilt: its runs keep saving
the full weights.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mmsphere.config import build_config
from mmsphere.digest import tensors_sha256
from mmsphere.errors import DataError, MmsphereError
from mmsphere.models.config import ModelConfig
from mmsphere.models.dual_encoder import DualEncoder
from mmsphere.models.factory import HF_HUB_PREFIX, create_model
from mmsphere.models.weight_files import TRAINED_ONLY_KEY, check_compatible, shapes_of

logger = logging.getLogger(__name__)

REFERENCE_KEYS = ("name", "pretrained", "model_config", "sha256")
SHOWN_DIGEST = 12  # hex digits of a digest in a message


def base_sha256(model: DualEncoder) -> str:
    """SHA-256 of the frozen base: the tensors of :meth:`DualEncoder.frozen_state_names`, by content."""
    state = model.state_dict()
    tensors = [(name, state[name]) for name in model.frozen_state_names()]
    # a tensor's _version counts its in-place changes: the same storages, unchanged, have the same digest, so
    # a run hashes its frozen base once, not at every checkpoint
    key = tuple((name, tensor.data_ptr(), tensor._version) for name, tensor in tensors)
    cached = getattr(model, "_frozen_base_digest", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    digest = tensors_sha256(tensors)
    model._frozen_base_digest = (key, digest)
    return digest


def base_reference(model: DualEncoder) -> dict[str, Any] | None:
    """What rebuilds the frozen base of ``model``; None when nothing is frozen or no source can rebuild it."""
    if not model.config.pretrained or not model.frozen_state_names():
        return None
    return {"name": _absolute_if_path(model.config.name),
            "pretrained": _absolute_if_path(model.config.pretrained),
            "model_config": dataclasses.asdict(model.config),
            "sha256": base_sha256(model),
            "tensors": len(model.frozen_state_names())}


def log_saved_weights(model: DualEncoder) -> None:
    """Say in one INFO line what a frozen-tower run's checkpoints will hold (nothing when no tower is frozen)."""
    if not model.frozen_state_names():
        return
    reference = base_reference(model)
    if reference is None:
        logger.info("checkpoints and the run directory hold the full weights: the frozen towers start from random "
                    "initialisation (model.pretrained is not set), which no reference can rebuild")
    else:
        logger.info("checkpoints and the run directory hold the trained tensors only, with a reference to the "
                    "frozen base model.pretrained=%s (sha256 %s...)", reference["pretrained"],
                    reference["sha256"][:SHOWN_DIGEST])


def trained_state(model: DualEncoder) -> dict[str, torch.Tensor]:
    """The tensors training may change (all but the frozen base), on the CPU, each storage once."""
    frozen = set(model.frozen_state_names())
    state: dict[str, torch.Tensor] = {}
    seen: set[tuple] = set()
    for name, tensor in model.state_dict().items():
        if name in frozen:
            continue
        view = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                tensor.stride())
        if tensor.numel() and view in seen:
            continue  # a tied weight: loading its first name fills this one too
        seen.add(view)
        # clone: safetensors refuses two tensors over one storage, which distinct views of it would be
        state[name] = tensor.detach().cpu().contiguous().clone()
    return state


def save_trained(model: DualEncoder, path: str | os.PathLike, reference: dict[str, Any]) -> None:
    """Write the trained tensors of ``model`` to a safetensors file marked with its base's digest."""
    save_file(trained_state(model), str(path), metadata={"format": "pt", TRAINED_ONLY_KEY: reference["sha256"]})


def rebuild_base(reference: Any, where: str, model_config: ModelConfig | None = None) -> DualEncoder:
    """The frozen base ``reference`` names, rebuilt with its source and checked against its digest.

    ``model_config``: the run's own model section (the reference's copy otherwise); the model keeps it as
    ``.config``, built with the reference's absolute name and source.
    """
    check_reference(reference, where)
    if model_config is None:
        try:
            model_config = build_config(ModelConfig, reference["model_config"], "model.")
        except MmsphereError as error:
            raise DataError(f"{where}: the frozen-base reference holds a bad model config: {error}") from None
    build = dataclasses.replace(model_config, name=reference["name"], pretrained=reference["pretrained"])
    try:
        model = create_model(build)
    except MmsphereError as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(f"{where} was trained on the frozen base {_source(reference)} (sha256 "
                        f"{_short(reference['sha256'])}), found none: {reason}; put that base back at its source "
                        "to load the run") from None
    check_base(model, reference, where)
    model.config = model_config
    return model


def check_base(model: DualEncoder, reference: dict[str, Any], where: str) -> None:
    """Raise :class:`DataError` when the frozen base of ``model`` is not the one ``reference`` records."""
    found = base_sha256(model)
    if found != reference["sha256"]:
        raise DataError(f"{where} was trained on the frozen base {_source(reference)} with sha256 "
                        f"{_short(reference['sha256'])}, but the base found there has sha256 {_short(found)}; put "
                        "the original base weights back at that source to load the run")


def check_reference(reference: Any, where: str) -> None:
    """Raise :class:`DataError` when ``reference`` is not a frozen-base reference as :func:`base_reference` writes it."""
    if not isinstance(reference, dict) or any(key not in reference for key in REFERENCE_KEYS):
        raise DataError(f"{where}: its frozen-base reference is damaged (it needs {', '.join(REFERENCE_KEYS)})")
    if not all(isinstance(reference[key], str) for key in ("name", "pretrained", "sha256")) or not isinstance(
            reference["model_config"], dict):
        raise DataError(f"{where}: its frozen-base reference is damaged (name, pretrained and sha256 must be "
                        "strings, model_config an object)")


def load_trained(model: DualEncoder, path: str | os.PathLike) -> None:
    """Load a file of :func:`save_trained` into ``model``, whose frozen base is already in place."""
    path = Path(path)
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise DataError(f"cannot read {str(path)!r}: {str(error).splitlines()[0]}") from None
    frozen = set(model.frozen_state_names())
    expected = {name: shape for name, shape in shapes_of(model.state_dict()).items() if name not in frozen}
    check_compatible(expected, shapes_of(tensors), f"{str(path)!r}", "the trained tensors of the model",
                     allowed_missing=_tied_names(model))
    model.load_state_dict(tensors, strict=False)


def _tied_names(model: DualEncoder) -> set[str]:
    """State-dict names whose tensor shares storage with another (the trained file holds one of them)."""
    groups: dict[tuple, list[str]] = {}
    for name, tensor in model.state_dict().items():
        if tensor.numel():
            groups.setdefault((tensor.device, tensor.untyped_storage().data_ptr()), []).append(name)
    return {name for names in groups.values() if len(names) > 1 for name in names}


def _absolute_if_path(value: str) -> str:
    """A local file or directory as an absolute path (a reference is read from anywhere); a tag or name as it is."""
    if value.startswith(HF_HUB_PREFIX):
        return value
    path = Path(value).expanduser()
    return str(path.resolve()) if path.exists() else value


def _source(reference: dict[str, Any]) -> str:
    return f"model.pretrained={reference['pretrained']!r} (model.name={reference['name']!r})"


def _short(digest: str) -> str:
    return f"{digest[:SHOWN_DIGEST]}..."
