"""What a run records as it goes: ``metrics.jsonl``, ``sample_weights.jsonl`` and experiment trackers.

``metrics.jsonl`` is always written. Trackers are accelerate's own (``train.report_to`` is passed
as ``Accelerator(log_with=...)``): TensorBoard, Weights & Biases, MLflow, Comet, Aim, ClearML,
DVCLive, SwanLab, Trackio. Each receives the resolved config as flat hyper-parameters when the run
starts and every metrics record as it is written.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers
from accelerate.utils import LoggerType, gather_object

from mmsphere.config import config_to_dict
from mmsphere.errors import ConfigError
from mmsphere.train.config import Config

# the tracker's run is named after the project; TensorBoard writes into OUTPUT_DIR/<project>/
PROJECT_NAME = "mmsphere"
# what to pip-install for a tracker, where it is not the tracker's own name
_PACKAGES = {"aim": '"aim<4"'}  # accelerate's AimTracker needs aim 3.x


def check_trackers(names: Sequence[str], key: str = "train.report_to") -> None:
    """Raise :class:`ConfigError` for a tracker accelerate does not know (closest name suggested) or lacks."""
    known = sorted(LOGGER_TYPE_TO_CLASS)
    installed = {str(tracker) for tracker in get_available_trackers()}
    for index, name in enumerate(names):
        if name == "all":  # accelerate's "every installed tracker"
            continue
        if name not in LOGGER_TYPE_TO_CLASS:
            close = difflib.get_close_matches(name.lower(), known + ["all"], n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"{key}[{index}]={name!r} is not a tracker accelerate knows; {hint}"
                              f"choose from {', '.join(known)} or 'all'")
        # trackers registered with accelerate.tracking.register_tracker_class bring their own code
        if name in {str(member) for member in LoggerType} and name not in installed:
            raise ConfigError(f"{key}[{index}]={name!r}: the {name} package is not installed; "
                              f"pip install {_PACKAGES.get(name, name)}, or remove {name!r} from {key}")


def tracker_config(config: Config) -> dict[str, int | float | str | bool]:
    """The resolved config as flat ``section.key`` scalars, the only values trackers' hyper-parameter tables take.

    Lists are numbered (``data.train.0.urls``; dots and digits are valid MLflow parameter names),
    ``None`` becomes ``"null"`` and an empty list or mapping ``"[]"`` or ``"{}"``, so every key appears.
    """
    flat: dict[str, int | float | str | bool] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for name, item in value.items():
                walk(f"{prefix}.{name}" if prefix else str(name), item)
        elif isinstance(value, (list, tuple)) and value:
            for index, item in enumerate(value):
                walk(f"{prefix}.{index}", item)
        elif isinstance(value, (bool, int, float, str)):
            flat[prefix] = value
        else:
            flat[prefix] = json.dumps(value) if isinstance(value, (list, tuple, dict, type(None))) else str(value)

    walk("", config_to_dict(config))
    return flat


class RunLog:
    """``metrics.jsonl`` and ``sample_weights.jsonl`` of a run (main process), mirrored to ``train.report_to``."""

    def __init__(self, output_dir: Path, accelerator: Accelerator, config: Config) -> None:
        self.output_dir = output_dir
        self.accelerator = accelerator
        self.is_main = accelerator.is_main_process
        self.max_loss_seen = 0.0
        if config.train.report_to:
            # main process only (accelerate's decorator); the trackers are finished at the end of train()
            accelerator.init_trackers(PROJECT_NAME, config=tracker_config(config))

    def metrics(self, record: dict[str, Any]) -> None:
        """Append one line of metrics and send its numbers to the trackers at ``record["step"]``."""
        if self.is_main:
            with open(self.output_dir / "metrics.jsonl", "a") as handle:
                handle.write(json.dumps(record) + "\n")
        # a no-op without trackers, and on every process but the main one
        self.accelerator.log({name: value for name, value in record.items() if name != "step"}, step=record["step"])

    def sample_weights(self, step: int, keys: list[str], per_sample: torch.Tensor, weights: torch.Tensor | None) -> None:
        """Append ``{step, key, loss, weight}`` for every sample of the global batch."""
        if weights is None:
            return
        rows = [{"step": step, "key": key, "loss": float(loss), "weight": float(weight)}
                for key, loss, weight in zip(keys, per_sample.float().cpu().tolist(), weights.float().cpu().tolist())]
        if dist.is_available() and dist.is_initialized():
            rows = gather_object(rows)
        self.max_loss_seen = max([self.max_loss_seen] + [row["loss"] for row in rows])
        if self.is_main:
            with open(self.output_dir / "sample_weights.jsonl", "a") as handle:
                handle.writelines(json.dumps(row) + "\n" for row in rows)
