"""Broken copies of a saved run, shared by the CLI bad-input tests of eval and OoD."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from mmsphere.train.config import Config
from mmsphere.models import load_run, save_run


def incompatible_run(run_dir: Path, tmp_path: Path) -> Path:
    """A copy of ``run_dir`` claiming a run-directory format this version cannot read."""
    copy = Path(shutil.copytree(run_dir, tmp_path / "old_run"))
    info = json.loads((copy / "mmsphere.json").read_text())
    (copy / "mmsphere.json").write_text(json.dumps({**info, "format_version": 99}))
    return copy


def nan_run(run_dir: Path, tmp_path: Path) -> Path:
    """A copy of ``run_dir`` whose visual projection is NaN (features become non-finite)."""
    model = load_run(run_dir)
    with torch.no_grad():
        model.clip.visual.proj.fill_(float("nan"))
    save_run(model, Config(model=model.config), tmp_path / "nan_run")
    return tmp_path / "nan_run"
