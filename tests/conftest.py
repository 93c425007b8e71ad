"""Fixtures shared across test folders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmsphere.models.config import ModelConfig
from mmsphere.train.config import Config
from mmsphere.models import create_model, save_run


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory) -> Path:
    """A run directory holding a seeded ``mmsphere-tiny`` dual encoder."""
    torch.manual_seed(0)
    model = create_model(ModelConfig(name="mmsphere-tiny"))
    directory = tmp_path_factory.mktemp("run")
    save_run(model, Config(model=model.config), directory)
    return directory
