"""mmsphere: contrastive image-text and video-text representation learning on the unit hypersphere."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def load(run_dir: str, device: str = "cpu") -> Any:
    """Restore the trained dual encoder saved in a run directory (``model.safetensors`` + ``config.yaml``)."""
    # import cycle: mmsphere.models imports this package; lazy also keeps `import mmsphere` free of torch
    from mmsphere.models import load_run

    return load_run(run_dir, device=device)


def train(config: Any) -> Any:
    """Fine-tune from a :class:`~mmsphere.train.config.Config`; returns the training summary."""
    # import cycle: mmsphere.train imports this package; lazy also keeps `import mmsphere` free of torch
    from mmsphere.train import train as _train

    return _train(config)
