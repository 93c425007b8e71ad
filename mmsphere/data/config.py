"""The ``data`` section of a run's configuration: the shard sources and how samples are decoded."""

from __future__ import annotations

from dataclasses import dataclass, field

from mmsphere.config import require
from mmsphere.data.modalities import MODALITY_REGISTRY

__all__ = ["SourceConfig", "DataConfig"]

FEATURE_CACHE_DTYPES = ("float32", "float16")


@dataclass
class SourceConfig:
    """One stream of shards: a webdataset URL pattern, its modality and its sampling weight."""

    urls: str = ""
    modality: str = "video"  # a registered modality: video, image or one of yours (data/modalities.py)
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
    # how the cached features are stored: float32, or float16 (half the disk; read back as float32, so the
    # trained part sees the stored values rounded to float16: BENCHMARKS.md measures what that does to the loss)
    feature_cache_dtype: str = "float32"

    def validate(self) -> None:
        """Raise :class:`~mmsphere.errors.ConfigError` for values that are well-typed but impossible."""
        require(self.feature_cache_dtype in FEATURE_CACHE_DTYPES,
                f"data.feature_cache_dtype={self.feature_cache_dtype!r} must be one of {', '.join(FEATURE_CACHE_DTYPES)}")
        require(self.frames >= 1, f"data.frames={self.frames} must be >= 1")
        require(self.workers >= 0, f"data.workers={self.workers} must be >= 0")
        require(self.shuffle_buffer >= 0, f"data.shuffle_buffer={self.shuffle_buffer} must be >= 0")
        require(self.epoch_samples >= 1, f"data.epoch_samples={self.epoch_samples} must be >= 1")
        for index, source in enumerate(self.train + [s for s in (self.meta, self.val) if s is not None]):
            where = f"data source {source.name or index}"
            require(bool(source.urls), f"{where}: urls must name at least one shard")
            unknown = MODALITY_REGISTRY.check(source.modality, f"{where}: modality")
            require(unknown is None, unknown or "")
            require(source.weight > 0, f"{where}: weight={source.weight} must be > 0")
