"""The ``model`` section of a run's configuration: the dual encoder's architecture and how it trains."""

from __future__ import annotations

import math
from dataclasses import dataclass

from mmsphere.config import require
from mmsphere.models.temporal import TEMPORAL_HEADS

__all__ = ["ModelConfig", "MAX_LOG_LOGIT_SCALE"]

# training clamps log s to [0, this] (mmsphere.train.step); model.init_logit_scale must lie there too
MAX_LOG_LOGIT_SCALE = math.log(100.0)


@dataclass
class ModelConfig:
    """The dual encoder: an open_clip architecture plus a temporal head for video."""

    name: str = "ViT-B-32"  # open_clip architecture name or path to a JSON model config
    pretrained: str | None = None  # open_clip tag, local file, local directory or hf-hub:ORG/NAME
    temporal_head: str = "mean"  # a registered head: mean (CLIP4Clip meanP), transformer (seqTransf), yours
    temporal_layers: int = 1
    temporal_heads: int = 0  # 0 = width // 64, at least 1
    max_frames: int = 32  # size of the frame position embedding of the transformer head
    freeze_image: bool = False
    freeze_text: bool = False
    # all | heads | last_blocks=K: with "heads" the towers' trunks are frozen and only the projection heads,
    # the temporal head and logit_scale train (LiT-style probing of pretrained towers; cheap on CPU);
    # "last_blocks=K" also trains the last K blocks of each tower's block stack and every module after them
    trainable: str = "all"
    image_lr: float | None = None  # None = train.lr
    text_lr: float | None = None
    gradient_checkpointing: bool = False
    # the starts of the learnable logit bias b (created only when set) and of log s, open_clip's
    # init_logit_bias / init_logit_scale; null = the loss terms' starts (siglip: log s = ln 10,
    # open_clip's SigLIP start, and b at its row loss's minimiser for the global batch, −log(B − 1);
    # sphereface2 likewise), else no bias and open_clip's ln(1/0.07). A pretrained checkpoint's own
    # values replace them.
    init_logit_bias: float | None = None
    init_logit_scale: float | None = None

    @property
    def trainable_blocks(self) -> int | None:
        """K of ``trainable: last_blocks=K`` (None for ``all`` and ``heads``, or a malformed value)."""
        name, equals, count = self.trainable.partition("=")
        if name != "last_blocks" or not equals or not count.isdigit() or int(count) < 1:
            return None
        return int(count)

    def validate(self) -> None:
        """Raise :class:`~mmsphere.errors.ConfigError` for values that are well-typed but impossible."""
        unknown_head = TEMPORAL_HEADS.check(self.temporal_head, "model.temporal_head")  # registered heads only
        require(unknown_head is None, str(unknown_head))
        require(self.trainable in ("all", "heads") or self.trainable_blocks is not None,
                f"model.trainable={self.trainable!r} must be 'all', 'heads' or 'last_blocks=K' (K >= 1: the heads, "
                "the last K blocks of each tower and what follows them)")
        require(self.temporal_layers >= 1, f"model.temporal_layers={self.temporal_layers} must be >= 1")
        require(self.max_frames >= 1, f"model.max_frames={self.max_frames} must be >= 1")
        for key in ("init_logit_bias", "init_logit_scale"):
            value = getattr(self, key)
            require(value is None or math.isfinite(value), f"model.{key}={value} must be a finite number")
        require(self.init_logit_scale is None or 0 <= self.init_logit_scale <= MAX_LOG_LOGIT_SCALE,
                f"model.init_logit_scale={self.init_logit_scale} must be in [0, ln 100 = {MAX_LOG_LOGIT_SCALE:.4f}]: "
                f"it is the log of the logit multiplier, as open_clip's init_logit_scale (SigLIP: ln 10 = "
                f"{math.log(10):.4f})")
