"""Run directories for users: ``model.safetensors`` + the resolved ``config.yaml`` + ``mmsphere.json``.

``mmsphere.json`` carries the format version and the preprocessing the weights were trained with
(image size, mean, std), which a pretrained tag may have set and which the config alone cannot
restore. A run with frozen towers on a pretrained base (:mod:`mmsphere.models.frozen_base`) writes
format 2: ``model.safetensors`` holds the trained tensors only and ``mmsphere.json`` a ``frozen_base``
reference; loading rebuilds the base from it and checks its digest. Format 1 (full weights) is what
every other run writes, and what older versions wrote; both load. Files are written to temporary names, flushed to disk, then renamed over the old ones
(:func:`mmsphere.atomic.atomic_write`: with the umask's mode, 0644 typically).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

import mmsphere
from mmsphere.atomic import atomic_write
from mmsphere.config import build_config, config_to_dict, read_yaml_file, save_config
from mmsphere.errors import ConfigError, DataError, MmsphereError
from mmsphere.models.config import ModelConfig
from mmsphere.digest import file_sha256
from mmsphere.models.weight_files import check_compatible, tensor_shapes
from mmsphere.models.dual_encoder import DualEncoder
from mmsphere.models.factory import build_dual_encoder, create_model
from mmsphere.models.frozen_base import base_reference, load_trained, rebuild_base, save_trained

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1  # full weights
TRIMMED_FORMAT_VERSION = 2  # the trained tensors + a frozen-base reference
BASE_KEY = "frozen_base"  # the reference's key in mmsphere.json
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
INFO_FILE = "mmsphere.json"


def save_run(model: DualEncoder, config: Any, run_dir: str | os.PathLike) -> None:
    """Write ``model.safetensors``, ``config.yaml`` and ``mmsphere.json`` into ``run_dir`` atomically per file.

    ``config``: the run's ``mmsphere.train.config.Config``, whose ``model`` section built ``model``.
    """
    if not isinstance(model, DualEncoder):
        raise TypeError(
            f"save_run takes a DualEncoder, got {type(model).__name__}; unwrap a distributed model first "
            "(accelerator.unwrap_model)"
        )
    if config.model != model.config:
        differing = [key for key, value in vars(config.model).items() if getattr(model.config, key) != value]
        raise ValueError(
            f"config.model differs from the model's own config in {', '.join(differing)}; "
            "save the config the model was built from"
        )
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    reference = base_reference(model)  # None: full weights (nothing frozen, or a base no source rebuilds)
    info = {
        "format_version": FORMAT_VERSION if reference is None else TRIMMED_FORMAT_VERSION,
        "mmsphere_version": mmsphere.__version__,
        "torch_version": torch.__version__,
        "embed_dim": model.embed_dim,
        "image_size": model.image_size,
        "image_mean": list(model.image_mean),
        "image_std": list(model.image_std),
        "context_length": model.context_length,
    }
    if reference is not None:
        info[BASE_KEY] = reference
    writers = {
        WEIGHTS_FILE: (lambda path: save_model(model, str(path), metadata={"format": "pt"})) if reference is None
        else (lambda path: save_trained(model, path, reference)),
        CONFIG_FILE: lambda path: save_config(config, path),
        INFO_FILE: lambda path: path.write_text(json.dumps(info, indent=2) + "\n"),
    }
    with contextlib.ExitStack() as renames:
        # entered last to first, so renamed first to last when the block ends: mmsphere.json last, so a first
        # save shows it only once the weights and config are in place; an error while writing renames none
        temporary = {name: renames.enter_context(atomic_write(run_dir / name, durable=True))
                     for name in reversed(writers)}
        for name, write in writers.items():
            write(temporary[name])
    logger.info("saved the dual encoder to %s", run_dir)


def load_run(run_dir: str | os.PathLike, device: str | torch.device = "cpu") -> DualEncoder:
    """Restore the dual encoder of a run directory (in eval mode); its ``config.yaml``, as plain data, is ``.run_config``.

    Only the ``model`` section is built and checked here; ``mmsphere.train.config.load_config`` builds the whole run's.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"run directory {str(run_dir)!r} does not exist")
    for name in (INFO_FILE, CONFIG_FILE, WEIGHTS_FILE):
        if not (run_dir / name).is_file():
            raise DataError(f"run directory {str(run_dir)!r} has no {name}; is it a finished mmsphere run?")
    info = _read_info(run_dir / INFO_FILE)
    try:
        config = read_yaml_file(run_dir / CONFIG_FILE)
        model_config = build_config(ModelConfig, config.get("model"), "model.")
    except ConfigError as error:
        raise ConfigError(f"{str(run_dir / CONFIG_FILE)!r}: {error}") from None

    weights = run_dir / WEIGHTS_FILE
    if BASE_KEY in info:
        model = rebuild_base(info[BASE_KEY], f"run directory {str(run_dir)!r}", model_config)
        load_trained(model, weights)
        return _finish_loading(model, info, config, device)
    model = build_dual_encoder(model_config, load_pretrained=False)
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    check_compatible(
        expected,
        tensor_shapes(weights),
        f"{str(weights)!r}",
        f"the model described by {str(run_dir / CONFIG_FILE)!r}",
        allowed_missing=_shared_names(model),
    )
    load_model(model, str(weights), strict=True)
    return _finish_loading(model, info, config, device)


def _finish_loading(model: DualEncoder, info: dict, config: dict, device: str | torch.device) -> DualEncoder:
    """The preprocessing and the run's config onto a loaded model, moved to ``device`` in eval mode."""
    model.image_mean = tuple(float(value) for value in info.get("image_mean", model.image_mean))
    model.image_std = tuple(float(value) for value in info.get("image_std", model.image_std))
    model.run_config = config
    return model.to(device).eval()


def load_dual_encoder(run: str | os.PathLike | None = None, name: str | None = None, pretrained: str | None = None,
                      device: str | torch.device = "cpu") -> tuple[DualEncoder, dict[str, Any]]:
    """The dual encoder of a run directory or of an open_clip name + tag (in eval mode), and how to identify it.

    The identity (run directory, model config and weights SHA-256, or name and tag; embedding size, image
    size and logit scale) is what evaluation results record so that their numbers can be traced back.
    """
    if run is not None:
        if pretrained is not None:
            raise ConfigError("--pretrained goes with --model; a run directory holds its own weights")
        model = load_run(run, device=device)
        identity: dict[str, Any] = {"run_dir": str(Path(run).resolve()),
                                    "config": config_to_dict(model.config),
                                    "weights_sha256": file_sha256(Path(run) / WEIGHTS_FILE)}
        reference = _read_info(Path(run) / INFO_FILE).get(BASE_KEY)
        if reference is not None:
            # the weights file holds the trained tensors only: the base's digest completes the identity
            identity["frozen_base_sha256"] = reference["sha256"]
    elif name is not None:
        model = create_model(ModelConfig(name=name, pretrained=pretrained), device=device)
        identity = {"name": name, "pretrained": pretrained}
    else:
        raise ValueError("load_dual_encoder needs a run directory or an open_clip model name")
    model.eval()
    identity.update(embed_dim=model.embed_dim, image_size=model.image_size, logit_scale=float(
        model.log_logit_scale.detach().exp()))
    return model, identity


def _read_info(path: Path) -> dict:
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise MmsphereError(f"cannot read {str(path)!r}: {error}") from None
    if not isinstance(info, dict):
        raise MmsphereError(f"{str(path)!r} must hold a JSON object")
    if info.get("format_version") not in (FORMAT_VERSION, TRIMMED_FORMAT_VERSION):
        raise MmsphereError(
            f"{str(path)!r} has format_version={info.get('format_version')!r} (written by mmsphere "
            f"{info.get('mmsphere_version', '?')}); mmsphere {mmsphere.__version__} reads "
            f"format_version={FORMAT_VERSION} and {TRIMMED_FORMAT_VERSION}"
        )
    if (info["format_version"] == TRIMMED_FORMAT_VERSION) != (BASE_KEY in info):
        raise MmsphereError(f"{str(path)!r} is damaged: format_version={info['format_version']} goes "
                            f"{'with' if info['format_version'] == TRIMMED_FORMAT_VERSION else 'without'} "
                            f"a {BASE_KEY!r} reference")
    return info


def _shared_names(model: DualEncoder) -> set[str]:
    """State-dict names whose tensor shares storage with another name (safetensors stores only one of them)."""
    groups: dict[tuple[torch.device, int], list[str]] = {}
    for name, tensor in model.state_dict().items():
        pointer = tensor.untyped_storage().data_ptr()
        if pointer:  # empty tensors all report 0
            groups.setdefault((tensor.device, pointer), []).append(name)
    return {name for names in groups.values() if len(names) > 1 for name in names}

