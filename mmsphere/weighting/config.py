"""The ``meta`` section of a run's configuration: Meta-Weight-Net sample weighting."""

from __future__ import annotations

from dataclasses import dataclass

from mmsphere.config import require

__all__ = ["MetaConfig"]


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
    # jvp without accumulation or autocast: the meta iteration takes its virtual gradient from the real
    # step's own train forward (one forward fewer, the same updates); false runs its own forward first
    reuse_forward: bool = True

    def validate(self) -> None:
        """Raise :class:`~mmsphere.errors.ConfigError` for values that are well-typed but impossible."""
        require(self.interval >= 1, f"meta.interval={self.interval} must be >= 1")
        require(self.hidden >= 1, f"meta.hidden={self.hidden} must be >= 1")
        require(self.params in ("all", "last_blocks", "heads"),
                f"meta.params={self.params!r} must be 'all', 'last_blocks' or 'heads'")
        require(self.last_blocks >= 1, f"meta.last_blocks={self.last_blocks} must be >= 1")
        require(self.normalize in ("mean", "sum"), f"meta.normalize={self.normalize!r} must be 'mean' or 'sum'")
        require(self.virtual_lr is None or self.virtual_lr > 0, f"meta.virtual_lr={self.virtual_lr} must be > 0")
        require(self.batch_size is None or self.batch_size >= 2, f"meta.batch_size={self.batch_size} must be >= 2")
        require(self.weights_log_every >= 1, f"meta.weights_log_every={self.weights_log_every} must be >= 1")
        require(self.gradient in ("jvp", "second_order"),
                f"meta.gradient={self.gradient!r} must be 'jvp' or 'second_order'")
