"""A run's whole configuration: the ``train`` section and the root :class:`Config` that assembles every section.

Each section is declared and validated by the package that uses it (``models.config``,
``data.config``, ``losses.config``, ``weighting.config``); the root lives here, in the lowest layer
that sees all of them, with the checks that involve more than one section (ARCHITECTURE.md, Layers).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmsphere.config import build_config, read_config, require
from mmsphere.data.config import DataConfig
from mmsphere.errors import ConfigError
from mmsphere.losses.config import LossConfig
from mmsphere.losses.terms import TERMS, ResolvedTerm, resolve_terms
from mmsphere.models.config import ModelConfig
from mmsphere.models.temporal import TEMPORAL_HEADS
from mmsphere.weighting.config import MetaConfig

__all__ = ["TrainConfig", "Config", "load_config", "config_from_dict"]

logger = logging.getLogger(__name__)

# the model fields a loss term may start (open_clip's init_* arguments), and open_clip's CLIP start of log s
_MODEL_STARTS = ("init_logit_bias", "init_logit_scale")
OPEN_CLIP_LOG_SCALE = math.log(1 / 0.07)


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

    def validate(self) -> None:
        """Raise :class:`~mmsphere.errors.ConfigError` for values that are well-typed but impossible."""
        require(self.max_steps >= 1, f"train.max_steps={self.max_steps} must be >= 1")
        require(self.batch_size >= 2, f"train.batch_size={self.batch_size} must be >= 2 (contrastive)")
        require(self.lr > 0, f"train.lr={self.lr} must be > 0")
        require(self.weight_decay >= 0, f"train.weight_decay={self.weight_decay} must be >= 0")
        require(self.warmup_steps >= 0, f"train.warmup_steps={self.warmup_steps} must be >= 0")
        require(self.grad_clip is None or self.grad_clip > 0, f"train.grad_clip={self.grad_clip} must be > 0")
        require(self.precision in ("no", "bf16", "fp16"),
                f"train.precision={self.precision!r} must be 'no', 'bf16' or 'fp16'")
        require(self.accum_freq >= 1, f"train.accum_freq={self.accum_freq} must be >= 1")
        require(self.batch_size % self.accum_freq == 0,
                f"train.batch_size={self.batch_size} must be divisible by train.accum_freq={self.accum_freq}")
        require(self.checkpoint_every >= 1, f"train.checkpoint_every={self.checkpoint_every} must be >= 1")
        require(self.keep_checkpoints >= 1, f"train.keep_checkpoints={self.keep_checkpoints} must be >= 1")
        require(self.max_nonfinite_steps >= 1,
                f"train.max_nonfinite_steps={self.max_nonfinite_steps} must be >= 1")


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

    def validate(self) -> None:
        """The checks across sections (each section checked itself); fills the loss terms' model defaults."""
        model, data = self.model, self.data
        bounded = TEMPORAL_HEADS.lookup(model.temporal_head).bounded_by_max_frames  # frame position embeddings
        require(data.frames <= model.max_frames or not bounded,
                f"data.frames={data.frames} exceeds model.max_frames={model.max_frames}")
        resolved = resolve_terms(self.loss.terms)
        if _fill_term_model_defaults(model, resolved, self.train.batch_size):
            model.validate()  # the starts a term chose obey the model's own bounds
        needs_bias = [term.name for term in resolved if TERMS[term.name].needs_logit_bias]
        require(not needs_bias or model.init_logit_bias is not None,
                f"loss.terms.{needs_bias[0] if needs_bias else ''} needs a learnable logit bias: set "
                f"model.init_logit_bias (the term declares no start for it)")
        if self.meta.enabled:
            require(data.meta is not None, "meta.enabled=true needs data.meta (the clean meta set's shards)")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Build a validated :class:`Config` from a YAML file and ``dotted.key=value`` overrides."""
    return config_from_dict(read_config(Config, path, overrides))


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a :class:`Config` from a plain nested dict (older loss keys are migrated)."""
    return build_config(Config, raw)


def _fill_term_model_defaults(model: ModelConfig, resolved: list[ResolvedTerm], batch_size: int) -> bool:
    """Set the ``model.<field>`` values the config leaves null to the loss terms' starts; log it.

    The scale first, since a term's bias start may depend on it (``Term.model_starts``); the batch
    is the global one. Values are rounded to the float32 the model stores. Returns whether any was set.
    """
    chosen: dict[str, tuple[float, str]] = {}

    def choose(key: str, value: float, term: str) -> None:
        if key not in _MODEL_STARTS:
            raise ConfigError(f"loss.terms.{term} declares a start for model.{key}, which is not one of "
                              f"{', '.join(_MODEL_STARTS)}")
        if getattr(model, key) is not None:
            return
        value = float(np.float32(value))
        if key in chosen and chosen[key][0] != value:
            raise ConfigError(f"loss.terms.{chosen[key][1]} starts model.{key} at {chosen[key][0]:g}, "
                              f"loss.terms.{term} at {value:g}: set model.{key}")
        chosen.setdefault(key, (value, term))

    for term in resolved:
        if "init_logit_scale" in term.term_class.model_defaults:
            choose("init_logit_scale", term.term_class.model_defaults["init_logit_scale"], term.name)
    log_scale = model.init_logit_scale if model.init_logit_scale is not None else chosen.get(
        "init_logit_scale", (OPEN_CLIP_LOG_SCALE, ""))[0]
    for term in resolved:
        starts = term.term_class.model_starts(term.options, batch_size=batch_size, logit_scale=math.exp(log_scale))
        for key, value in starts.items():
            choose(key, value, term.name)
    filled: dict[str, list[str]] = {}
    for key, (value, term) in chosen.items():
        setattr(model, key, value)
        filled.setdefault(term, []).append(f"model.{key}={value:.4g}")
    for term, settings in filled.items():
        logger.info("unset in the config, so at loss.terms.%s's starts for a global batch of %d: %s (set them to "
                    "override)", term, batch_size, ", ".join(settings))
    return bool(chosen)


