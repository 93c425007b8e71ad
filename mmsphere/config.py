"""One typed configuration tree, loaded from YAML with ``dotted.key=value`` overrides.

Validation happens here, when the config is built: unknown keys (with the closest valid key
suggested), wrong types and impossible values raise :class:`ConfigError` before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# the error family lives in mmsphere.errors; re-exported here, where it was first defined
from mmsphere.errors import ConfigError, DataError, MmsphereError  # noqa: F401
from mmsphere.user_modules import import_user_module

if typing.TYPE_CHECKING:
    from mmsphere.losses.terms import ResolvedTerm  # import cycle at run time: the terms import this module

logger = logging.getLogger(__name__)


@dataclass
class ModelConfig:
    """The dual encoder: an open_clip architecture plus a temporal head for video."""

    name: str = "ViT-B-32"  # open_clip architecture name or path to a JSON model config
    pretrained: str | None = None  # open_clip tag, local file, local directory or hf-hub:ORG/NAME
    temporal_head: str = "mean"  # mean (CLIP4Clip meanP) | transformer (CLIP4Clip seqTransf)
    temporal_layers: int = 1
    temporal_heads: int = 0  # 0 = width // 64, at least 1
    max_frames: int = 32  # size of the frame position embedding of the transformer head
    freeze_image: bool = False
    freeze_text: bool = False
    # all | heads: with "heads" the towers' trunks are frozen and only the projection heads, the
    # temporal head and logit_scale train (LiT-style probing of pretrained towers; cheap on CPU)
    trainable: str = "all"
    image_lr: float | None = None  # None = train.lr
    text_lr: float | None = None
    gradient_checkpointing: bool = False
    # the starts of the learnable logit bias b (created only when set) and of log s, open_clip's
    # init_logit_bias / init_logit_scale; null = the loss terms' defaults (siglip: b = -10, log s =
    # ln 10, open_clip's SigLIP start), else no bias and open_clip's ln(1/0.07). A pretrained
    # checkpoint's own values replace them.
    init_logit_bias: float | None = None
    init_logit_scale: float | None = None


@dataclass
class SourceConfig:
    """One stream of shards: a webdataset URL pattern, its modality and its sampling weight."""

    urls: str = ""
    modality: str = "video"  # video | image
    weight: float = 1.0
    name: str = ""


@dataclass
class DataConfig:
    """Where samples come from and how they are decoded."""

    train: list[SourceConfig] = field(default_factory=list)
    meta: SourceConfig | None = None  # clean meta set for meta-learned weighting
    val: SourceConfig | None = None
    frames: int = 8
    image_size: int | None = None  # None = the model's own input size
    workers: int = 0
    shuffle_buffer: int = 1000
    resampled: bool = True
    fast_decode: bool = False  # seek to the nearest keyframe instead of exact decoding (train only)
    random_offset: bool = False  # random-offset segments instead of linspace frames (train only)
    epoch_samples: int = 10000  # length of a virtual epoch, in samples per process
    # frozen trunks (model.trainable=heads): encode each sample once into a feature cache next to the
    # shards and train, validate and evaluate the heads from it (mmsphere.cache; `mmsphere cache`)
    feature_cache: bool = False
    feature_cache_dir: str | None = None  # None = beside each shard folder, in features/<fingerprint>/


@dataclass
class LossConfig:
    """The composed objective: which terms, their weights and their hyper-parameters."""

    # term name -> weight, or -> {weight: ..., <the term's fields>}; the names are those of the term
    # registry (mmsphere.losses.terms), including a user's own terms from the modules in `imports`
    terms: dict[str, Any] = field(default_factory=lambda: {"angular_margin": 1.0})
    positives: str = "diagonal"  # diagonal | group: samples sharing a group id are positives of each other
    imports: list[str] = field(default_factory=list)  # modules that register terms (loss.imports: [my_terms])
    # the flat fields of configs written before per-term fields; a term's own field wins
    margin: float = 0.1
    m2mix_alpha: float = 0.5
    tau_mix: float = 0.07
    uniformity_t: float = 2.0
    calibration_alpha: float = 0.5
    min_sim: float = 0.0
    max_sim: float = 0.8
    detach_calibration: bool = True
    local_loss: bool = False
    gather_with_grad: bool = True


@dataclass
class MetaConfig:
    """Meta-Weight-Net sample weighting (NeurIPS'19, as used by MAMA)."""

    enabled: bool = False
    interval: int = 1
    hidden: int = 100
    lr: float = 1e-3
    weight_decay: float = 1e-4
    virtual_lr: float | None = None  # None = the current learning rate
    params: str = "heads"  # all | last_blocks | heads
    last_blocks: int = 1
    normalize: str = "mean"  # mean | sum
    batch_size: int | None = None  # None = train.batch_size
    # sample_weights.jsonl gets every sample of every weights_log_every-th step (bounded, and a sample's
    # weight is followed through training, which the demo's weight AUROC needs)
    weights_log_every: int = 10
    # how the exact meta-gradient is computed: jvp (first-order passes + one forward-mode pass) or
    # second_order (differentiating through the virtual step; the reference, more memory)
    gradient: str = "jvp"


@dataclass
class TrainConfig:
    """The optimisation loop."""

    max_steps: int = 1000
    batch_size: int = 32  # global: split evenly over processes, then over accum_freq micro-batches
    lr: float = 1e-5
    weight_decay: float = 0.2
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 100
    grad_clip: float | None = 1.0
    precision: str = "no"  # no | bf16 | fp16
    accum_freq: int = 1
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    resume: str | None = None  # path, "latest" or null
    log_every: int = 10
    val_every: int = 0  # 0 = only at the end
    max_nonfinite_steps: int = 5  # this many non-finite losses in a row stop the run
    cpu: bool = False  # force CPU processes even where CUDA exists
    # accelerate trackers (log_with names: tensorboard, wandb, mlflow, comet_ml, aim, clearml, dvclive,
    # swanlab, trackio, all); metrics.jsonl is written either way
    report_to: list[str] = field(default_factory=list)


@dataclass
class Config:
    """The whole run."""

    output_dir: str = "runs/default"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# --------------------------------------------------------------------------------------------
# building from dicts, YAML and overrides


# Words a bool field accepts, from YAML files and overrides alike (case-insensitive).
BOOLEAN_WORDS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}
# Words that mean None in an override of a nullable field (case-insensitive; an empty value too).
NULL_WORDS = ("null", "none", "~", "")


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 booleans: only true/false, so ``precision: no`` is the string 'no'."""


# YAML 1.1, PyYAML's default, also reads unquoted yes/no/on/off as booleans. Then `precision: no`
# (accelerate's spelling) would arrive as False, and False could have been written no, off or
# false, so a string field could not tell what was meant. Reading those words as strings keeps
# what the user wrote; a bool field still takes them (BOOLEAN_WORDS), and a string field that
# receives true/false is an error that asks for quotes rather than a guess.
_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def load_yaml(text: str) -> Any:
    """Parse YAML the way config files are read (YAML 1.2 booleans; see :class:`_YamlLoader`)."""
    return yaml.load(text, Loader=_YamlLoader)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Build a validated :class:`Config` from a YAML file and ``dotted.key=value`` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            raw = load_yaml(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {error}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    for override in overrides or []:
        apply_override(raw, override)
    return config_from_dict(raw)


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Set ``dotted.key=value`` in a raw config dict, the value read as the declared type of its field.

    A string field takes the text as written (``train.precision=no`` is ``"no"``; quote it as YAML,
    ``key="'a b'"``, to strip the quotes); a nullable field takes null, none, ~ or nothing as None;
    a bool field true/false, yes/no, on/off; a number field a number. Lists, mappings, whole
    sections and keys without a declared type are parsed as YAML. An integer part indexes a list:
    ``data.train.0.urls=...`` sets the first source's urls, ``train.betas.1=0.95`` the second beta.
    """
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like dotted.key=value")
    key, _, text = override.partition("=")
    key = key.strip()
    parts = key.split(".")
    node: dict[str, Any] | list[Any] = raw
    for depth, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            child = node[_list_index(node, parts[: depth + 1], override)]
        else:
            child = node.get(part)
            if child is None:
                # a list the config does not set is its default (train.betas), so that an index can name an entry
                default = _declared_default(parts[: depth + 1]) if parts[depth + 1].isdigit() else None
                child = node[part] = {} if default is None else default
        if not isinstance(child, (dict, list)):
            raise ConfigError(f"override {override!r}: {'.'.join(parts[: depth + 1])} is not a section or a list")
        node = child
    value = _parse_override(_declared_type(parts), text.strip(), key)
    if isinstance(node, list):
        node[_list_index(node, parts, override)] = value
    else:
        node[parts[-1]] = value


def _list_index(entries: list[Any], parts: list[str], override: str) -> int:
    """The entry of a list that the last of ``parts`` names, or a ConfigError naming the list and its length."""
    name, part = ".".join(parts[:-1]), parts[-1]
    count = f"{len(entries)} {'entry' if len(entries) == 1 else 'entries'}"
    if not part.isdigit():
        raise ConfigError(f"override {override!r}: {name} is a list of {count}; name one by its index, as in "
                          f"{name}.0.{part}")
    index = int(part)
    if index >= len(entries):
        size = f"{name} has {count} (0 to {len(entries) - 1})" if entries else f"{name} is empty"
        raise ConfigError(f"override {override!r}: index {index} is out of range: {size}; to add entries, set the "
                          f"whole list ({name}=[...])")
    return index


def _declared_type(parts: list[str]) -> Any:
    """The type hint of the field that the dotted key names, or None for a key no field declares."""
    hint: Any = Config
    for part in parts:
        hint, _ = _without_none(hint)
        if dataclasses.is_dataclass(hint):
            hints = typing.get_type_hints(hint)
            if part not in hints:
                return None  # unknown: _build reports it with the closest valid key
            hint = hints[part]
        elif typing.get_origin(hint) is dict:
            hint = typing.get_args(hint)[1]
        elif typing.get_origin(hint) in (list, tuple) and part.isdigit():
            entries = typing.get_args(hint)  # list[X]: every entry an X; tuple[X, Y]: one type per entry
            hint = entries[0] if typing.get_origin(hint) is list else entries[min(int(part), len(entries) - 1)]
        else:
            return None
    return hint


def _declared_default(parts: list[str]) -> list[Any] | None:
    """The default of the list field that the dotted key names, as plain data; None for any other key."""
    default: Any = config_to_dict(Config())
    for part in parts:
        default = default.get(part) if isinstance(default, dict) else None
    return default if isinstance(default, list) else None


def _parse_override(hint: Any, text: str, key: str) -> Any:
    """The plain value of an override's text for a field of type ``hint``; :func:`_coerce` checks it."""
    inner, nullable = _without_none(hint)
    if nullable and text.lower() in NULL_WORDS:
        return None
    if inner is str:
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
            return _parse_yaml(text, key)  # a quoted YAML scalar: the quotes are not part of the value
        return text
    if inner is bool:
        return text  # _coerce maps BOOLEAN_WORDS and names the key for anything else
    if inner is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{key}={text!r} must be an integer") from None
    if inner is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{key}={text!r} must be a number") from None
    return _parse_yaml(text, key) if text else None


def _parse_yaml(text: str, key: str) -> Any:
    try:
        return load_yaml(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"override {key}={text!r} is not valid YAML: {error}") from None


def _without_none(hint: Any) -> tuple[Any, bool]:
    """``(X, True)`` for ``X | None``, ``(hint, False)`` otherwise."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint):
        inner = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        return inner[0], True
    return hint, False


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a :class:`Config` from a plain nested dict."""
    config = _build(Config, raw, "")
    validate(config)
    return config


def config_to_dict(config: Config) -> dict[str, Any]:
    """The config as plain YAML-safe data (tuples become lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [plain(item) for item in value]
        if isinstance(value, dict):
            return {key: plain(item) for key, item in value.items()}
        return value

    return plain(dataclasses.asdict(config))


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in raw.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key {prefix}{key}{hint}")
        values[key] = _coerce(hints[key], value, f"{prefix}{key}")
    return cls(**values)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [arg for arg in args if arg is not type(None)]
        return _coerce(inner[0], value, key)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".")
    if origin is list:
        if not isinstance(value, list):
            value = [value]
        return [_coerce(args[0], item, f"{key}[{index}]") for index, item in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}={value!r} must be a list of {len(args)} values")
        return tuple(_coerce(arg, item, key) for arg, item in zip(args, value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r} must be a mapping")
        return {str(name): _coerce(args[1], item, f"{key}.{name}") for name, item in value.items()}
    if hint is bool:
        if isinstance(value, str) and value.lower() in BOOLEAN_WORDS:
            return BOOLEAN_WORDS[value.lower()]
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be true or false (or yes/no, on/off)")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r} must be an integer")
        return value
    if hint is float:
        if isinstance(value, str):
            # YAML 1.1 reads 2e-3 (no dot) as a string; users mean the number
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r} must be a number")
        return float(value)
    if hint is str:
        if isinstance(value, bool):
            # only YAML's unquoted true/false get here (see _YamlLoader); which string was meant is a guess
            raise ConfigError(f"{key}={value!r} must be a string; YAML reads unquoted true/false as "
                              f"booleans, so write the string you mean in quotes")
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{key}={value!r} must be a string")
        return str(value)
    return value


# --------------------------------------------------------------------------------------------
# values that parse but are impossible


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


# training clamps log s to [0, this] (mmsphere.train.step); model.init_logit_scale must lie there too
MAX_LOG_LOGIT_SCALE = math.log(100.0)


def _fill_term_model_defaults(model: ModelConfig, resolved: list[ResolvedTerm]) -> None:
    """Set the ``model.<field>`` values the config leaves null to the loss terms' ``model_defaults``; log it."""
    chosen: dict[str, tuple[float, str]] = {}
    for term in resolved:
        for key, value in term.term_class.model_defaults.items():
            if getattr(model, key) is not None:
                continue
            if key in chosen and chosen[key][0] != value:
                raise ConfigError(f"loss.terms.{chosen[key][1]} starts model.{key} at {chosen[key][0]:g}, "
                                  f"loss.terms.{term.name} at {value:g}: set model.{key}")
            chosen.setdefault(key, (float(value), term.name))
    filled: dict[str, list[str]] = {}
    for key, (value, term) in chosen.items():
        setattr(model, key, value)
        filled.setdefault(term, []).append(f"model.{key}={value:.4g}")
    for term, settings in filled.items():
        logger.info("unset in the config, so at loss.terms.%s's defaults: %s (set them to override)",
                    term, ", ".join(settings))


def validate(config: Config) -> None:
    """Raise :class:`ConfigError` for values that are well-typed but impossible; fill the loss terms' model defaults."""
    model, data, loss, meta, train = config.model, config.data, config.loss, config.meta, config.train
    _check(model.temporal_head in ("mean", "transformer"),
           f"model.temporal_head={model.temporal_head!r} must be 'mean' or 'transformer'")
    _check(model.trainable in ("all", "heads"), f"model.trainable={model.trainable!r} must be 'all' or 'heads'")
    _check(model.temporal_layers >= 1, f"model.temporal_layers={model.temporal_layers} must be >= 1")
    _check(model.max_frames >= 1, f"model.max_frames={model.max_frames} must be >= 1")
    _check(data.frames >= 1, f"data.frames={data.frames} must be >= 1")
    _check(data.frames <= model.max_frames or model.temporal_head == "mean",
           f"data.frames={data.frames} exceeds model.max_frames={model.max_frames}")
    _check(data.workers >= 0, f"data.workers={data.workers} must be >= 0")
    _check(data.shuffle_buffer >= 0, f"data.shuffle_buffer={data.shuffle_buffer} must be >= 0")
    _check(data.epoch_samples >= 1, f"data.epoch_samples={data.epoch_samples} must be >= 1")
    for index, source in enumerate(data.train + [s for s in (data.meta, data.val) if s is not None]):
        where = f"data source {source.name or index}"
        _check(bool(source.urls), f"{where}: urls must name at least one shard")
        _check(source.modality in ("video", "image"),
               f"{where}: modality={source.modality!r} must be 'video' or 'image'")
        _check(source.weight > 0, f"{where}: weight={source.weight} must be > 0")

    _check(loss.positives in ("diagonal", "group"),
           f"loss.positives={loss.positives!r} must be 'diagonal' or 'group'")
    for module in loss.imports:
        try:
            import_user_module(module)  # registers the user's own terms (found in the working directory too)
        except ImportError as error:
            raise ConfigError(f"loss.imports: cannot import {module!r} ({error})") from None
    # import cycle: mmsphere.losses.objective/terms import mmsphere.config; also keeps this module free of torch
    from mmsphere.losses.objective import legacy_fields
    from mmsphere.losses.terms import TERMS, resolve_terms

    resolved = resolve_terms(loss.terms, legacy_fields(loss))
    _fill_term_model_defaults(model, resolved)
    for key in ("init_logit_bias", "init_logit_scale"):
        value = getattr(model, key)
        _check(value is None or math.isfinite(value), f"model.{key}={value} must be a finite number")
    _check(model.init_logit_scale is None or 0 <= model.init_logit_scale <= MAX_LOG_LOGIT_SCALE,
           f"model.init_logit_scale={model.init_logit_scale} must be in [0, ln 100 = {MAX_LOG_LOGIT_SCALE:.4f}]: it is "
           f"the log of the logit multiplier, as open_clip's init_logit_scale (SigLIP: ln 10 = {math.log(10):.4f})")
    needs_bias = [term.name for term in resolved if TERMS[term.name].needs_logit_bias]
    _check(not needs_bias or model.init_logit_bias is not None,
           f"loss.terms.{needs_bias[0] if needs_bias else ''} needs a learnable logit bias: set model.init_logit_bias "
           f"(SigLIP starts at -10, with the logit scale at 10)")
    _check(loss.gather_with_grad or not loss.local_loss,
           "loss.local_loss=true needs loss.gather_with_grad=true: each rank's rows must send gradients "
           "to the other ranks' features")

    _check(meta.interval >= 1, f"meta.interval={meta.interval} must be >= 1")
    _check(meta.hidden >= 1, f"meta.hidden={meta.hidden} must be >= 1")
    _check(meta.params in ("all", "last_blocks", "heads"),
           f"meta.params={meta.params!r} must be 'all', 'last_blocks' or 'heads'")
    _check(meta.last_blocks >= 1, f"meta.last_blocks={meta.last_blocks} must be >= 1")
    _check(meta.normalize in ("mean", "sum"), f"meta.normalize={meta.normalize!r} must be 'mean' or 'sum'")
    _check(meta.virtual_lr is None or meta.virtual_lr > 0, f"meta.virtual_lr={meta.virtual_lr} must be > 0")
    _check(meta.batch_size is None or meta.batch_size >= 2, f"meta.batch_size={meta.batch_size} must be >= 2")
    _check(meta.weights_log_every >= 1, f"meta.weights_log_every={meta.weights_log_every} must be >= 1")
    _check(meta.gradient in ("jvp", "second_order"),
           f"meta.gradient={meta.gradient!r} must be 'jvp' or 'second_order'")
    if meta.enabled:
        _check(data.meta is not None, "meta.enabled=true needs data.meta (the clean meta set's shards)")

    _check(train.max_steps >= 1, f"train.max_steps={train.max_steps} must be >= 1")
    _check(train.batch_size >= 2, f"train.batch_size={train.batch_size} must be >= 2 (contrastive)")
    _check(train.lr > 0, f"train.lr={train.lr} must be > 0")
    _check(train.weight_decay >= 0, f"train.weight_decay={train.weight_decay} must be >= 0")
    _check(train.warmup_steps >= 0, f"train.warmup_steps={train.warmup_steps} must be >= 0")
    _check(train.grad_clip is None or train.grad_clip > 0, f"train.grad_clip={train.grad_clip} must be > 0")
    _check(train.precision in ("no", "bf16", "fp16"),
           f"train.precision={train.precision!r} must be 'no', 'bf16' or 'fp16'")
    _check(train.accum_freq >= 1, f"train.accum_freq={train.accum_freq} must be >= 1")
    _check(train.batch_size % train.accum_freq == 0,
           f"train.batch_size={train.batch_size} must be divisible by train.accum_freq={train.accum_freq}")
    _check(train.checkpoint_every >= 1, f"train.checkpoint_every={train.checkpoint_every} must be >= 1")
    _check(train.keep_checkpoints >= 1, f"train.keep_checkpoints={train.keep_checkpoints} must be >= 1")
    _check(train.max_nonfinite_steps >= 1,
           f"train.max_nonfinite_steps={train.max_nonfinite_steps} must be >= 1")
