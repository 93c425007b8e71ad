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

from mmsphere.train.config import config_from_dict
from mmsphere.train import train

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


def _accelerate_launch(script: Path, *arguments: str) -> subprocess.CompletedProcess:
    """``accelerate launch -q --multi_gpu --num_processes 2 SCRIPT ARGUMENTS`` on CPU processes (gloo)."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "-q", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), str(script), *arguments]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=_environment())


def _printed_errors(stderr: str) -> list[str]:
    """The error lines the processes printed (not the launcher's report of them, whose lines say ``traceback :``)."""
    return [line for line in stderr.splitlines() if line.startswith("mmsphere train: error:")]


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes(image_text_shards, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` really trains on 2 gloo processes without GPUs.

    And looks it: one summary (process 0's, with the validation), no warning from DDP about a search
    for unused parameters that finds none, none from torch's forward mode (the meta step), and only the
    lines a user acts on; open_clip's messages are in the run's log.
    """
    raw = tiny_config(image_text_shards, tmp_path / "run", meta={"enabled": True, "interval": 1, "hidden": 8, "weights_log_every": 1},
                      train={"max_steps": 3, "batch_size": 8, "checkpoint_every": 3, "log_every": 1, "cpu": False})
    raw["data"]["val"] = {"urls": image_text_shards["meta"], "modality": "image"}
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    result = _accelerate_launch(ROOT / "scripts" / "train.py", "--config", str(config_path))
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3
    weights = (tmp_path / "run" / "sample_weights.jsonl").read_text().splitlines()
    assert len(weights) == 3 * 8  # both ranks' samples reach the log
    assert len({json.loads(line)["key"] for line in weights}) > 8

    assert json.loads(result.stdout) == summary  # once: process 0's
    assert summary["validation"]["val/t2v/R@1"] >= 0
    messages = [line for line in result.stderr.replace("\r", "\n").splitlines()
                if line.strip() and not line.startswith("train:")]
    assert messages == [f"run directory {tmp_path / 'run'} (log: {tmp_path / 'run' / 'train.log'})",
                        "training mmsphere-tiny from random initialisation (model.pretrained is not set)",
                        f"saved checkpoint {tmp_path / 'run' / 'checkpoints' / 'step_00000003'}"], result.stderr
    assert "Parsing model identifier" in (tmp_path / "run" / "train.log").read_text()


@pytest.mark.slow
def test_processes_that_see_different_output_dirs_stop_with_one_line(image_text_shards, tmp_path):
    """Nodes without a shared file system: every process raises, the terminal shows process 0's line once.

    The launcher's report of the failed processes (ChildFailedError) then ends with the same line,
    as its root cause, instead of a hint on how to enable tracebacks.
    """
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(tiny_config(image_text_shards, tmp_path / "unused", train={"cpu": False})))
    node = [json.dumps([f"output_dir={tmp_path / f'node{rank}' / 'run'}"]) for rank in range(2)]
    result = _accelerate_launch(HERE / "distributed_per_rank.py", str(config_path), *node)
    assert result.returncode == 1, result.stderr[-4000:]  # the launcher's status for a failed process
    assert _printed_errors(result.stderr) == [
        f"mmsphere train: error: output_dir='{tmp_path / 'node0' / 'run'}' is not one directory for all processes: "
        f"process 1 on {socket.gethostname()} cannot see the file process 0 on {socket.gethostname()} wrote there. "
        f"Training on several nodes needs output_dir on a file system every node mounts (NFS, Lustre, ...); point "
        f"output_dir there"], result.stderr
    root_cause = result.stderr[result.stderr.index("Root Cause"):]
    assert f"traceback : {_printed_errors(result.stderr)[0]}" in root_cause
    assert "Traceback (most recent call last)" not in result.stderr
    assert not (tmp_path / "node1").exists()


@pytest.mark.slow
def test_processes_that_would_resume_from_different_steps_stop_with_one_line(image_text_shards, tmp_path):
    run = tmp_path / "run"
    raw = tiny_config(image_text_shards, run, train={"max_steps": 2, "checkpoint_every": 1, "keep_checkpoints": 2})
    train(config_from_dict(raw))  # checkpoints at steps 1 and 2, in one process
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump({**raw, "train": {**raw["train"], "cpu": False, "max_steps": 4}}))
    resume = [json.dumps([f"train.resume={run / 'checkpoints' / f'step_0000000{rank + 1}'}"]) for rank in range(2)]
    result = _accelerate_launch(HERE / "distributed_per_rank.py", str(config_path), *resume)
    assert result.returncode == 1, result.stderr[-4000:]
    host = socket.gethostname()
    assert _printed_errors(result.stderr) == [
        f"mmsphere train: error: train.resume: the processes would resume from different checkpoints (process 0 on "
        f"{host}: step 1, process 1 on {host}: step 2) of output_dir='{run}'; every process must see the same "
        f"checkpoints"], result.stderr


@pytest.mark.slow
def test_an_error_of_process_1_alone_reaches_the_terminal_once(image_text_shards, tmp_path):
    """Process 1 cannot read its data; process 0 waits for it in a collective that then fails: only process 1's line.

    Process 1 prints after a grace period (when all fail alike, process 0's line is the one shown), marked
    with its rank; process 0's failed collective prints no traceback before the launcher stops it.
    """
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(tiny_config(image_text_shards, tmp_path / "run", train={"cpu": False})))
    missing = str(tmp_path / "node1-only" / "train-{000000..000003}.tar")
    result = _accelerate_launch(HERE / "distributed_per_rank.py", str(config_path), "[]",
                                json.dumps([f"data.train.0.urls={missing}"]))
    assert result.returncode == 1, result.stderr[-4000:]
    assert _printed_errors(result.stderr) == [
        f"mmsphere train: error: data.train[0].urls='{missing}': 4 of 4 shards do not exist (first: "
        f"{tmp_path / 'node1-only' / 'train-000000.tar'}) (process 1)"], result.stderr
    assert "Traceback (most recent call last)" not in result.stderr and "Connection closed" not in result.stderr


@pytest.mark.slow
def test_late_rank_does_not_mistake_the_new_run_for_an_old_one(image_text_shards, tmp_path):
    """Rank 0 writes config.yaml only after every rank has checked the output directory.

    Every rank's ``train()`` returns the same validation metrics (rank 0 computes them).
    """
    raw = tiny_config(image_text_shards, tmp_path / "run", train={"max_steps": 1, "cpu": False})
    raw["data"]["val"] = {"urls": image_text_shards["meta"], "modality": "image"}
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    _torchrun(2, str(HERE / "distributed_slow_rank.py"), str(config_path))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 1
    returned = [json.loads((tmp_path / f"returned_by_rank{rank}.json").read_text()) for rank in range(2)]
    assert returned[1]["validation"] == returned[0]["validation"] == summary["validation"] != {}
