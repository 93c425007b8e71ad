"""A run's whole configuration: the ``train`` section and the root :class:`Config` that assembles every section.

Each section is declared and validated by the package that uses it (``models.config``,
``data.config``, ``losses.config``, ``weighting.config``); the root lives here, in the lowest layer
that sees all of them, with the checks that involve more than one section (ARCHITECTURE.md, Layers).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
        if _fill_term_model_defaults(model, resolved):
            model.validate()  # the starts a term chose obey the model's own bounds
        needs_bias = [term.name for term in resolved if TERMS[term.name].needs_logit_bias]
        require(not needs_bias or model.init_logit_bias is not None,
                f"loss.terms.{needs_bias[0] if needs_bias else ''} needs a learnable logit bias: set "
                f"model.init_logit_bias (SigLIP starts at -10, with the logit scale at 10)")
        if self.meta.enabled:
            require(data.meta is not None, "meta.enabled=true needs data.meta (the clean meta set's shards)")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Build a validated :class:`Config` from a YAML file and ``dotted.key=value`` overrides."""
    return config_from_dict(read_config(Config, path, overrides))


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a :class:`Config` from a plain nested dict (older loss keys are migrated)."""
    return build_config(Config, raw)


def _fill_term_model_defaults(model: ModelConfig, resolved: list[ResolvedTerm]) -> bool:
    """Set the ``model.<field>`` values the config leaves null to the loss terms' ``model_defaults``; log it.

    Returns whether any field was set.
    """
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
    return bool(chosen)


