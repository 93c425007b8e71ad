"""Weight files (pretrained open_clip checkpoints, a run's ``model.safetensors``): read safely, checked before loading.

Not the trainer's resumable state, which is :mod:`mmsphere.train.checkpoint`.

Only tensors are ever read: safetensors files directly, anything else through
``torch.load(weights_only=True)``. A mismatch is reported by naming a few offending keys rather than
torch's full list, which for a ViT-L runs to hundreds of lines.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from mmsphere.config import DataError, MmsphereError

SHOWN_KEYS = 5  # offending keys named in a mismatch message
# safetensors metadata of a frozen-tower run's weights file (mmsphere.models.frozen_base): it holds the trained
# tensors only, its value is the digest of the frozen base they need
TRAINED_ONLY_KEY = "mmsphere_frozen_base_sha256"
DATA_PARALLEL_PREFIX = "module."


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` or torch checkpoint, unwrapped from ``state_dict`` and ``module.``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"checkpoint file {str(path)!r} does not exist")
    if path.suffix == ".safetensors" and _trained_only(path):
        raise DataError(
            f"checkpoint {str(path)!r} holds only the trained tensors of a frozen-tower run, not whole weights; "
            "load that run with mmsphere.load, or start from its `mmsphere export` directory"
        )
    try:
        if path.suffix == ".safetensors":
            checkpoint = load_file(str(path), device="cpu")
        else:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise MmsphereError(
            f"cannot read checkpoint {str(path)!r}: it is corrupt or holds more than tensors "
            f"({_unpickler_reason(error)}); checkpoints are loaded with weights_only=True, objects are never unpickled"
        ) from None
    except (SafetensorError, OSError, RuntimeError, ValueError, EOFError) as error:
        raise MmsphereError(f"cannot read checkpoint {str(path)!r}: {error}") from None

    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("state_dict"), Mapping):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, Mapping) or not checkpoint:
        raise MmsphereError(f"checkpoint {str(path)!r} holds no state dict (got {type(checkpoint).__name__})")
    not_tensors = [str(key) for key, value in checkpoint.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise MmsphereError(
            f"checkpoint {str(path)!r} is not a state dict: entries {_few(not_tensors)} are not tensors"
        )
    state_dict = {str(key): value for key, value in checkpoint.items()}
    # checkpoints saved from a DistributedDataParallel wrapper prefix every key
    if all(key.startswith(DATA_PARALLEL_PREFIX) for key in state_dict):
        state_dict = {key[len(DATA_PARALLEL_PREFIX):]: value for key, value in state_dict.items()}
    return state_dict


def _trained_only(path: Path) -> bool:
    """Whether a safetensors file is a frozen-tower run's trained tensors (its header says so)."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return TRAINED_ONLY_KEY in (handle.metadata() or {})
    except (SafetensorError, OSError):
        return False  # read_state_dict names what is wrong with the file


def tensor_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors in a safetensors file, read from its header only."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except (SafetensorError, OSError) as error:
        raise MmsphereError(f"cannot read safetensors file {str(path)!r}: {error}") from None


def check_compatible(
    expected: Mapping[str, tuple[int, ...]],
    found: Mapping[str, tuple[int, ...]],
    source: str,
    target: str,
    allowed_missing: set[str] | frozenset[str] = frozenset(),
) -> None:
    """Raise :class:`MmsphereError` naming a few missing, unexpected and mis-shaped keys, if any."""
    missing = [key for key in expected if key not in found and key not in allowed_missing]
    unexpected = [key for key in found if key not in expected]
    mis_shaped = [
        f"{key} {list(found[key])} vs {list(expected[key])}"
        for key in expected
        if key in found and tuple(found[key]) != tuple(expected[key])
    ]
    if not (missing or unexpected or mis_shaped):
        return
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s) such as {_few(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s) such as {_few(unexpected)}")
    if mis_shaped:
        problems.append(f"{len(mis_shaped)} shape mismatch(es) (checkpoint vs model) such as {_few(mis_shaped)}")
    raise MmsphereError(f"{source} does not match {target}: " + "; ".join(problems))


def shapes_of(state_dict: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of a state dict."""
    return {key: tuple(value.shape) for key, value in state_dict.items()}


def _unpickler_reason(error: Exception) -> str:
    # torch's message is a page of advice to retry with weights_only=False; keep only the reason
    _, marker, rest = str(error).partition("WeightsUnpickler error:")
    reason = next((line.strip() for line in rest.splitlines() if line.strip()), "") if marker else ""
    if reason:
        return reason.split(" was not an allowed global")[0]
    return type(error).__name__


def _few(keys: list[str]) -> str:
    shown = ", ".join(keys[:SHOWN_KEYS])
    return shown + (", ..." if len(keys) > SHOWN_KEYS else "")
