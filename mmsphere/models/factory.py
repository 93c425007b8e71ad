"""``create_model``: an open_clip architecture (name or JSON file) + pretrained weights -> DualEncoder.

``model.pretrained`` may be an open_clip tag or ``hf-hub:ORG/NAME`` (both handed to open_clip and
downloaded, so they need network or a warm cache), a local checkpoint file, or a local directory in
open_clip's hf-hub layout. Local weights are read here rather than by open_clip so that a wrong or
unreadable file fails with its name and a few offending keys.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.model import convert_to_custom_text_state_dict, resize_pos_embed, resize_text_pos_embed
from open_clip.pretrained import download_pretrained_from_hf
from torch import nn

from mmsphere.errors import ConfigError, DataError, MmsphereError
from mmsphere.models.config import ModelConfig
from mmsphere.models.weight_files import check_compatible, read_state_dict, shapes_of
from mmsphere.models.dual_encoder import DualEncoder

logger = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).resolve().parent.parent / "model_configs"
OPEN_CLIP_CONFIG_DIR = Path(open_clip.__file__).resolve().parent / "model_configs"
# checkpoint file names looked for in a pretrained directory, in order (open_clip's hf-hub layout)
DIRECTORY_CHECKPOINTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "model.safetensors")
DIRECTORY_CONFIG = "open_clip_config.json"
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
HF_HUB_PREFIX = "hf-hub:"
REQUIRED_ARCHITECTURE_KEYS = ("embed_dim", "vision_cfg", "text_cfg")


def register_model_configs() -> None:
    """Make the package's own architectures (``mmsphere-tiny``, ``mmsphere-small``) known to open_clip."""
    if "mmsphere-tiny" not in open_clip.list_models():
        open_clip.add_model_config(MODEL_CONFIG_DIR)


def create_model(config: ModelConfig, device: str | torch.device = "cpu") -> DualEncoder:
    """Build the dual encoder described by ``config`` and load ``config.pretrained`` weights, if any."""
    return build_dual_encoder(config, device=device, load_pretrained=True)


def create_run_model(config: Any) -> DualEncoder:
    """The model a run starts from: every generator seeded with ``config.seed``, then :func:`create_model`.

    ``config``: the run's ``mmsphere.train.config.Config`` (its ``seed`` and ``model`` are read).

    Training and ``mmsphere cache`` both build their model here, so randomly initialised towers are
    the same in both and a feature cache built ahead of time is the one a run reads.
    """
    from accelerate.utils import set_seed  # lazy: accelerate takes a while to import

    set_seed(config.seed)
    return create_model(config.model)


def build_dual_encoder(
    config: ModelConfig, device: str | torch.device = "cpu", *, load_pretrained: bool = True
) -> DualEncoder:
    """``create_model``; ``load_pretrained=False`` reads no weights at all, for callers that load their own."""
    architecture = resolve_architecture(config.name)
    preprocess_override: dict[str, Any] = {}
    checkpoint: Path | None = None
    source = resolve_pretrained(config.pretrained, architecture) if load_pretrained else None

    if source is not None and source[0] == "tag":
        clip = _create_open_clip(architecture, pretrained=source[1], config=config)
    else:
        if source is not None and source[0] == "file":
            checkpoint = Path(source[1])
        elif source is not None and source[0] == "directory":
            checkpoint, preprocess_override = _directory_checkpoint(Path(source[1]))
        elif source is not None and source[0] == "hf-hub":
            checkpoint, preprocess_override = _download_hf_hub(source[1])
        # when full weights follow (a checkpoint, or a run directory's), keep open_clip from fetching an
        # HF text tower's own weights; its warning that the model is initialised randomly is either wrong
        # (weights follow) or, without model.pretrained, what was asked for: said below, as information
        weights_follow = checkpoint is not None or not load_pretrained
        with _without_random_init_warning():
            clip = _create_open_clip(architecture, pretrained=None, pretrained_text=not weights_follow, config=config)
        if not weights_follow:
            logger.info("model %s starts from random initialisation (model.pretrained is not set)", config.name)

    tokenizer = open_clip.get_tokenizer(architecture)
    context_length = _context_length(clip, tokenizer, architecture)
    preprocess = {**clip.visual.preprocess_cfg, **preprocess_override}
    model = DualEncoder(
        clip,
        tokenizer,
        config,
        embed_dim=int(open_clip.get_model_config(architecture)["embed_dim"]),
        image_size=_square_size(preprocess["size"], architecture),
        image_mean=_three_floats(preprocess["mean"], "mean"),
        image_std=_three_floats(preprocess["std"], "std"),
        context_length=context_length,
    )
    # the resolved config the towers were built from (a feature cache is keyed by its content, not its name)
    model.architecture_config = open_clip.get_model_config(architecture)
    if checkpoint is not None:
        load_weights(model, checkpoint, target=f"the {architecture} architecture")
    return model.to(device)


# --------------------------------------------------------------------------------------------
# architecture


def resolve_architecture(name: str) -> str:
    """The open_clip registry name of ``model.name``: a known architecture, or a JSON file registered by stem."""
    if name.endswith(".json") or Path(name).is_file():
        return _register_json(Path(name))
    known = open_clip.list_models()
    # open_clip accepts the OpenAI spelling ViT-B/32 for ViT-B-32
    for candidate in (name, name.replace("/", "-")):
        if candidate in known:
            return candidate
    by_lower = {known_name.lower(): known_name for known_name in known}
    close = [by_lower[match] for match in difflib.get_close_matches(name.lower(), list(by_lower), n=5, cutoff=0.6)]
    hint = f"; close matches: {', '.join(close)}" if close else "; see open_clip.list_models()"
    raise ConfigError(f"model.name={name!r} is neither an open_clip architecture nor a JSON config file{hint}")


def _register_json(path: Path) -> str:
    if not path.is_file():
        raise DataError(f"model.name: architecture config file {str(path)!r} does not exist")
    try:
        architecture = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"model.name: cannot read architecture config {str(path)!r}: {error}") from None
    if not isinstance(architecture, dict):
        raise ConfigError(f"model.name: architecture config {str(path)!r} must hold a JSON object")
    missing = [key for key in REQUIRED_ARCHITECTURE_KEYS if key not in architecture]
    if missing:
        raise ConfigError(f"model.name: architecture config {str(path)!r} lacks {', '.join(missing)}")
    name = path.stem
    registered = open_clip.get_model_config(name)
    if registered == architecture:
        return name
    if registered is not None and _is_shipped(name):
        raise ConfigError(
            f"model.name: {str(path)!r} would replace the shipped architecture {name!r} with a different "
            "config; give the file another name"
        )
    # open_clip's registry is keyed by file stem and the last registered file wins
    open_clip.add_model_config(path)
    return name


def _is_shipped(name: str) -> bool:
    return any((directory / f"{name}.json").is_file() for directory in (OPEN_CLIP_CONFIG_DIR, MODEL_CONFIG_DIR))


def _create_open_clip(architecture: str, pretrained: str | None, config: ModelConfig,
                      pretrained_text: bool = True) -> nn.Module:
    # open_clip's own arguments: CLIP(init_logit_bias=b) holds a learnable logit_bias, init_logit_scale
    # starts log s (pretrained weights replace both); unset, the architecture's own (no bias, ln(1/0.07))
    extra = {key: getattr(config, key) for key in ("init_logit_bias", "init_logit_scale")
             if getattr(config, key) is not None}
    if pretrained is None:
        return open_clip.create_model(architecture, pretrained=None, pretrained_text=pretrained_text, **extra)
    try:
        return open_clip.create_model(architecture, pretrained=pretrained, **extra)
    except RuntimeError as error:
        raise MmsphereError(
            f"model.pretrained={pretrained!r}: open_clip could not load the {architecture} weights ({error}); "
            "tags are downloaded, so they need network access or a filled cache"
        ) from None


@contextlib.contextmanager
def _without_random_init_warning() -> Iterator[None]:
    root = logging.getLogger()  # open_clip logs through the root logger
    drop = _DropRandomInitWarning()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded")


def _context_length(clip: nn.Module, tokenizer: Any, architecture: str) -> int:
    context_length = int(tokenizer.context_length)
    text_tower = getattr(clip, "text", clip)
    capacity = int(getattr(text_tower, "context_length", 0) or 0)
    if capacity and context_length > capacity:
        raise ConfigError(
            f"architecture {architecture!r}: text_cfg.context_length={context_length} exceeds the text "
            f"tower's {capacity} positions"
        )
    return context_length


def _square_size(size: Any, architecture: str) -> int:
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise ConfigError(f"architecture {architecture!r}: non-square image size {size} is not supported")
        size = size[0]
    return int(size)


def _three_floats(values: Any, what: str) -> tuple[float, float, float]:
    values = tuple(float(value) for value in values)
    if len(values) != 3:
        raise ConfigError(f"image {what} must have 3 values (one per channel), got {values}")
    return values


# --------------------------------------------------------------------------------------------
# pretrained weights


def resolve_pretrained(pretrained: str | None, architecture: str) -> tuple[str, str] | None:
    """Classify ``model.pretrained`` as ``("tag"|"file"|"directory"|"hf-hub", value)``, or None."""
    if not pretrained:
        return None
    if pretrained.startswith(HF_HUB_PREFIX):
        return "hf-hub", pretrained[len(HF_HUB_PREFIX):]
    path = Path(pretrained).expanduser()
    if path.is_dir():
        return "directory", str(path)
    if path.is_file():
        return "file", str(path)
    tags = open_clip.list_pretrained_tags_by_model(architecture)
    if pretrained.lower() in (tag.lower() for tag in tags):
        return "tag", pretrained
    if os.sep in pretrained or "/" in pretrained or path.suffix in CHECKPOINT_SUFFIXES:
        raise DataError(f"model.pretrained: checkpoint {pretrained!r} does not exist")
    known = f"its tags: {', '.join(tags)}" if tags else "it has no open_clip tags"
    raise ConfigError(
        f"model.pretrained={pretrained!r} is neither an existing file or directory nor an open_clip tag "
        f"of {architecture} ({known})"
    )


def _directory_checkpoint(directory: Path) -> tuple[Path, dict[str, Any]]:
    checkpoint = next((directory / name for name in DIRECTORY_CHECKPOINTS if (directory / name).is_file()), None)
    if checkpoint is None:
        raise DataError(
            f"model.pretrained: directory {str(directory)!r} holds none of {', '.join(DIRECTORY_CHECKPOINTS)}"
        )
    config_path = directory / DIRECTORY_CONFIG
    return checkpoint, _preprocess_from(config_path) if config_path.is_file() else {}


def _download_hf_hub(model_id: str) -> tuple[Path, dict[str, Any]]:
    try:
        checkpoint = download_pretrained_from_hf(model_id)
        config_path = download_pretrained_from_hf(model_id, filename=DIRECTORY_CONFIG)
    except Exception as error:  # huggingface_hub raises many types (offline, 404, auth)
        raise MmsphereError(
            f"model.pretrained=hf-hub:{model_id}: download failed ({error}); hf-hub weights need network "
            "access or a filled cache"
        ) from None
    return Path(checkpoint), _preprocess_from(Path(config_path))


def _preprocess_from(config_path: Path) -> dict[str, Any]:
    """Image mean/std of an ``open_clip_config.json`` (its ``preprocess_cfg``), if it gives them."""
    try:
        content = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise MmsphereError(f"cannot read {str(config_path)!r}: {error}") from None
    preprocess = content.get("preprocess_cfg", {}) if isinstance(content, dict) else {}
    return {key: preprocess[key] for key in ("mean", "std") if key in preprocess}


def load_weights(model: DualEncoder, path: str | os.PathLike, target: str) -> None:
    """Load an open_clip or a dual-encoder (``clip.*``/``temporal.*``) checkpoint, checking keys and shapes first."""
    path = Path(path)
    state_dict = read_state_dict(path)
    if any(key.startswith("clip.") for key in state_dict):
        # a whole dual encoder, e.g. a previous run's model.safetensors
        _keep_initial_logit_bias(model, state_dict, "clip.logit_bias", path)
        source = f"checkpoint {str(path)!r}"
        check_compatible(shapes_of(model.state_dict()), shapes_of(state_dict), source, f"the dual encoder of {target}")
        model.load_state_dict(state_dict)
        logger.info("loaded the dual encoder weights of %s", path)
        return
    state_dict = _adapt_to_architecture(model.clip, state_dict, path, target)
    _keep_initial_logit_bias(model, state_dict, "logit_bias", path)
    check_compatible(shapes_of(model.clip.state_dict()), shapes_of(state_dict), f"checkpoint {str(path)!r}", target)
    model.clip.load_state_dict(state_dict)
    logger.info("loaded open_clip weights of %s", path)


def _keep_initial_logit_bias(model: DualEncoder, state_dict: dict[str, torch.Tensor], key: str, path: Path) -> None:
    """A checkpoint without SigLIP's bias (any CLIP) for a model given one (``model.init_logit_bias``): keep its start value.

    Fine-tuning a CLIP checkpoint with the siglip term is the usual way to get one; the bias the
    config asks for is the start SigLIP prescribes, not a weight the checkpoint lost.
    """
    if key in state_dict or getattr(model.clip, "logit_bias", None) is None:
        return
    state_dict[key] = model.clip.logit_bias.detach().clone()
    logger.info("%s holds no logit_bias: it starts at model.init_logit_bias=%.4g", path,
                float(model.clip.logit_bias.detach().reshape(-1)[0]))


def _adapt_to_architecture(
    clip: nn.Module, state_dict: dict[str, torch.Tensor], path: Path, target: str
) -> dict[str, torch.Tensor]:
    """open_clip's own conversions of older layouts: flat text tower, scalar logit_scale, resized position grids."""
    if "positional_embedding" in state_dict and not hasattr(clip, "positional_embedding"):
        state_dict = convert_to_custom_text_state_dict(state_dict)
    if "logit_scale" in state_dict and state_dict["logit_scale"].ndim != clip.logit_scale.ndim:
        state_dict["logit_scale"] = state_dict["logit_scale"].reshape(clip.logit_scale.shape)
    # transformers >= 4.31 no longer keeps position_ids in the state dict
    position_ids = "text.transformer.embeddings.position_ids"
    if position_ids in state_dict and position_ids not in clip.state_dict():
        del state_dict[position_ids]
    try:
        resize_pos_embed(state_dict, clip)
        resize_text_pos_embed(state_dict, clip)
    except (RuntimeError, ValueError) as error:
        # a grid that cannot be resized means a different architecture: say which keys differ
        check_compatible(shapes_of(clip.state_dict()), shapes_of(state_dict), f"checkpoint {str(path)!r}", target)
        raise MmsphereError(f"checkpoint {str(path)!r}: cannot resize its position embeddings: {error}") from None
    return state_dict
