"""Tiny dual encoders and architecture files shared by the model tests."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import open_clip
import pytest
import torch

from mmsphere.models.config import ModelConfig
from mmsphere.models import DualEncoder, create_model


@pytest.fixture
def make_model() -> Callable[..., DualEncoder]:
    """Build a seeded ``mmsphere-tiny`` dual encoder; keyword arguments go to ModelConfig."""

    def make(seed: int = 0, **fields) -> DualEncoder:
        torch.manual_seed(seed)
        return create_model(ModelConfig(**{"name": "mmsphere-tiny", **fields}))

    return make


@pytest.fixture
def write_architecture(tmp_path: Path) -> Callable[..., str]:
    """Write a variant of ``mmsphere-tiny`` as an open_clip JSON file; returns its path."""

    def write(stem: str, vision: dict | None = None, text: dict | None = None, embed_dim: int | None = None) -> str:
        architecture = open_clip.get_model_config("mmsphere-tiny")
        architecture["vision_cfg"].update(vision or {})
        architecture["text_cfg"].update(text or {})
        if embed_dim is not None:
            architecture["embed_dim"] = embed_dim
        path = tmp_path / f"{stem}.json"
        path.write_text(json.dumps(architecture))
        return str(path)

    return write


@pytest.fixture
def random_frames() -> Callable[..., torch.Tensor]:
    """Seeded normalised-pixel-like frames ``[B, T, 3, size, size]``."""

    def frames(batch: int, length: int, size: int = 32, seed: int = 0) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return torch.randn(batch, length, 3, size, size, generator=generator)

    return frames


@pytest.fixture
def perturb() -> Callable[..., None]:
    """Add N(0, std²) noise to every parameter of a module, so that no zero initialisation hides a bug."""

    def add_noise(module: torch.nn.Module, seed: int = 1, std: float = 0.2) -> None:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in module.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * std)

    return add_noise
