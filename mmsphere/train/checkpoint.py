"""Training state for resume: ``accelerator.save_state`` into a temporary directory, then a rename.

A checkpoint directory is complete exactly when it is named ``step_<8-digit step>`` and holds
``trainer_state.json``; the rename is the last thing that happens, so a run killed mid-write leaves
only a ``.tmp-*`` directory that is never picked as ``latest``. Each process also writes its own
data position (``data_position_<process index>.json``: where its data streams stand, see
:meth:`mmsphere.data.TrainStream.state_dict`) into the temporary directory before the rename.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from mmsphere.errors import DataError

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
DATA_POSITION_FILE = "data_position_{}.json"


def checkpoint_dir(output_dir: str | Path) -> Path:
    """Where the checkpoints of a run live."""
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    complete = [path for path in root.glob("step_*") if (path / STATE_FILE).is_file()]
    return sorted(complete, key=lambda path: int(path.name.split("_")[1]))


def resolve_resume(output_dir: str | Path, resume: str | None) -> Path | None:
    """The checkpoint ``train.resume`` names: a path, ``latest`` (None when there is none yet) or null."""
    if resume is None:
        return None
    if resume == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise DataError(f"train.resume={resume!r} is not a complete checkpoint (no {STATE_FILE})")
    return path


def save_checkpoint(accelerator: Accelerator, output_dir: str | Path, step: int, state: dict[str, Any],
                    keep: int, data_position: dict[str, Any] | None = None) -> Path:
    """Save the full training state atomically; every process must call this.

    ``state``: the run's state (the main process writes it); ``data_position``: this process's own.
    """
    root = checkpoint_dir(output_dir)
    final = root / f"step_{step:08d}"
    temporary = root / f".tmp-step_{step:08d}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(temporary, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    if data_position is not None:
        (temporary / DATA_POSITION_FILE.format(accelerator.process_index)).write_text(json.dumps(data_position))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (temporary / STATE_FILE).write_text(json.dumps({"step": step, **state}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(temporary, final)
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        logger.info("saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: str | Path) -> dict[str, Any]:
    """Restore model, optimisers, scheduler and RNG from ``path``; returns its trainer state.

    ``state["data_position"]`` is this process's data position, or None when the checkpoint has none
    for it (written before positions were saved, or by fewer processes).
    """
    accelerator.load_state(str(path))
    state = json.loads((Path(path) / STATE_FILE).read_text())
    position = Path(path) / DATA_POSITION_FILE.format(accelerator.process_index)
    state["data_position"] = json.loads(position.read_text()) if position.is_file() else None
    return state
