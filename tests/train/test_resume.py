"""A run killed with SIGKILL after a checkpoint resumes from that step, never from a half-written one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mmsphere.train.checkpoint import list_checkpoints, resolve_resume

from .conftest import tiny_config

ROOT = Path(__file__).resolve().parents[2]


def _train_command(config_path: Path, *overrides: str) -> list[str]:
    return [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(config_path), *overrides]


@pytest.mark.slow
def test_sigkill_then_resume_latest(image_text_shards, tmp_path):
    run = tmp_path / "run"
    raw = tiny_config(image_text_shards, run, train={"max_steps": 40, "checkpoint_every": 4, "log_every": 1,
                                                      "keep_checkpoints": 3})
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    environment = dict(os.environ, OMP_NUM_THREADS="1")

    process = subprocess.Popen(_train_command(config_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env=environment)
    deadline = time.time() + 180
    while not list_checkpoints(run):
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "no checkpoint within 180 s"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (run / "summary.json").exists(), "the first run finished before it could be killed"

    complete = list_checkpoints(run)[-1]
    step_at_kill = int(complete.name.split("_")[1])
    assert step_at_kill < 40
    # what a kill during a save leaves behind: a temporary directory and a directory without its state file
    (run / "checkpoints" / ".tmp-step_00000099").mkdir()
    (run / "checkpoints" / "step_00000098").mkdir()
    (run / "checkpoints" / "step_00000098" / "model.safetensors").write_bytes(b"partial")
    assert resolve_resume(run, "latest") == complete

    # resuming without train.resume is refused: the directory holds a run
    refused = subprocess.run(_train_command(config_path), capture_output=True, text=True, env=environment)
    assert refused.returncode != 0 and "train.resume=latest" in refused.stderr

    resumed = subprocess.run(_train_command(config_path, "train.resume=latest"), capture_output=True, text=True,
                             env=environment, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_from_step"] == step_at_kill
    assert summary["steps"] == 40
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    after_resume = [record["step"] for record in metrics][-(40 - step_at_kill):]
    assert after_resume == list(range(step_at_kill + 1, 41))
    assert (run / "model.safetensors").is_file()
