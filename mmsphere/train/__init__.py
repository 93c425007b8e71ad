"""Fine-tuning under accelerate: the loop, its optimiser, checkpoints and pre-flight checks."""

from mmsphere.train.loop import train

__all__ = ["train"]
