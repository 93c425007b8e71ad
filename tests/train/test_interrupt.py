"""Ctrl-C: a clean stop with one line, the command that resumes the run, and no half-written checkpoint."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mmsphere.train.checkpoint import STATE_FILE, checkpoint_dir, list_checkpoints

from .conftest import tiny_config

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train.py"


@pytest.mark.slow
def test_ctrl_c_prints_the_resume_command_which_resumes(image_text_shards, tmp_path):
    run = tmp_path / "run"
    raw = tiny_config(image_text_shards, run, train={"max_steps": 1000, "checkpoint_every": 2, "log_every": 1})
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    environment = dict(os.environ, OMP_NUM_THREADS="1")
    # a session of its own: the signal goes to the process group, as a terminal's Ctrl-C does
    process = subprocess.Popen([sys.executable, str(SCRIPT), "--config", str(config_path), "train.log_every=2"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment,
                               start_new_session=True)
    deadline = time.time() + 180
    while not list_checkpoints(run):
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.time() < deadline, "no checkpoint within 180 s"
        time.sleep(0.05)
    partial = checkpoint_dir(run) / ".tmp-step_00000999"  # as if Ctrl-C came while a checkpoint was written
    partial.mkdir()
    os.killpg(process.pid, signal.SIGINT)
    out, err = process.communicate(timeout=120)

    assert process.returncode == 130, err[-3000:]
    assert out == "" and "Traceback" not in err and "KeyboardInterrupt" not in err
    assert not partial.exists() and all((path / STATE_FILE).is_file() for path in checkpoint_dir(run).iterdir())
    last = list_checkpoints(run)[-1]
    step = int(last.name.split("_")[1])
    command = (f"python {SCRIPT} --config {config_path} train.log_every=2 train.resume=latest output_dir={run}")
    assert err.rstrip("\n").splitlines()[-1] == (
        f"mmsphere train: interrupted; the last checkpoint is step {step}. Resume with: {command}")

    resumed = subprocess.run([sys.executable, *shlex.split(command)[1:], f"train.max_steps={step + 1}"],
                             capture_output=True, text=True, timeout=300, env=environment)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads(resumed.stdout)
    assert summary["resumed_from_step"] == step and summary["steps"] == step + 1
