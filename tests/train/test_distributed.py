"""Several CPU processes over gloo: exact equivalence with one process, and a real launched run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from .conftest import tiny_config

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _environment() -> dict[str, str]:
    environment = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    environment.pop("CUDA_VISIBLE_DEVICES", None)
    return environment


def _torchrun(processes: int, *arguments: str, timeout: int = 240) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
               "--master_addr=127.0.0.1", f"--master_port={_free_port()}", *arguments]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=_environment())
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def one_step_runs(tmp_path_factory) -> dict[int, Path]:
    """Output folders of one optimisation step on 1 and on 2 processes, for all four set-ups."""
    folders = {}
    for processes in (1, 2):
        folders[processes] = tmp_path_factory.mktemp(f"world{processes}")
        _torchrun(processes, str(HERE / "distributed_step.py"), str(folders[processes]))
    return folders


@pytest.mark.slow
@pytest.mark.parametrize("meta", [False, True], ids=["meta_off", "meta_on"])
@pytest.mark.parametrize("local_loss", [False, True], ids=["global_loss", "local_loss"])
def test_two_processes_equal_one_process_on_the_concatenated_batch(one_step_runs, meta, local_loss):
    name = f"meta{int(meta)}_local{int(local_loss)}.pt"
    one, two = (torch.load(one_step_runs[processes] / name, weights_only=True) for processes in (1, 2))
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-9)
    for name, value in one["parameters"].items():
        torch.testing.assert_close(two["parameters"][name], value, rtol=1e-8, atol=1e-10, msg=name)
    if meta:
        for name, value in one["weight_net"].items():
            torch.testing.assert_close(two["weight_net"][name], value, rtol=1e-8, atol=1e-10, msg=name)


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes(image_text_shards, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` really trains on 2 gloo processes without GPUs."""
    raw = tiny_config(image_text_shards, tmp_path / "run", meta={"enabled": True, "interval": 1, "hidden": 8, "weights_log_every": 1},
                      train={"max_steps": 3, "batch_size": 8, "checkpoint_every": 3, "log_every": 1, "cpu": False})
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()),
               str(ROOT / "scripts" / "train.py"), "--config", str(config_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=_environment())
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3
    weights = (tmp_path / "run" / "sample_weights.jsonl").read_text().splitlines()
    assert len(weights) == 3 * 8  # both ranks' samples reach the log
    assert len({json.loads(line)["key"] for line in weights}) > 8


@pytest.mark.slow
def test_late_rank_does_not_mistake_the_new_run_for_an_old_one(image_text_shards, tmp_path):
    """Rank 0 writes config.yaml only after every rank has checked the output directory."""
    raw = tiny_config(image_text_shards, tmp_path / "run", train={"max_steps": 1, "cpu": False})
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    _torchrun(2, str(HERE / "distributed_slow_rank.py"), str(config_path))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 1
