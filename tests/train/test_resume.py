"""A run killed with SIGKILL after a checkpoint resumes from that step, never from a half-written one.

With finite shards it also resumes mid-epoch at the very next batch of every rank's streams: the
steps after the resume see the samples, and reach the losses and weights, of a run never stopped.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from mmsphere.train.config import config_from_dict
from mmsphere.data import build_train_stream
from mmsphere.train.checkpoint import list_checkpoints, resolve_resume

from .conftest import tiny_config, write_image_text_shards

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


STEPS = 14
CHECKPOINT_EVERY = 5  # steps 5 and 10 are in the middle of a 6-batch epoch, and of a 12-batch one with 2 processes


@pytest.fixture(scope="module")
def finite_shards(tmp_path_factory) -> dict[str, str]:
    """Two train sources and a meta set with 4 shards each: 2 processes x 2 loader workers read one shard each."""
    root = tmp_path_factory.mktemp("finite")
    return {"photos": write_image_text_shards(root, "photos", shards=4, per_shard=12, seed=2),
            "drawings": write_image_text_shards(root, "drawings", shards=4, per_shard=12, seed=3),
            "meta": write_image_text_shards(root, "meta", shards=4, per_shard=8, seed=4)}


def _finite_config(shards: dict[str, str], run: Path) -> dict:
    return tiny_config(
        {"train": shards["photos"], "meta": shards["meta"]}, run,
        data={"train": [{"urls": shards["photos"], "modality": "image", "weight": 2.0, "name": "photos"},
                        {"urls": shards["drawings"], "modality": "image", "weight": 1.0, "name": "drawings"}],
              "resampled": False, "workers": 2, "shuffle_buffer": 16, "epoch_samples": 48},
        # a high WeightNet rate, so that its path shows which meta batches it saw
        meta={"enabled": True, "interval": 1, "hidden": 8, "lr": 0.05, "weights_log_every": 1},
        train={"max_steps": STEPS, "batch_size": 8, "checkpoint_every": CHECKPOINT_EVERY, "keep_checkpoints": 3})


def _launch(config_path: Path, processes: int, *overrides: str) -> list[str]:
    if processes == 1:
        return _train_command(config_path, *overrides)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}", "--master_addr=127.0.0.1",
            f"--master_port={port}", str(ROOT / "scripts" / "train.py"), "--config", str(config_path), *overrides]


def _environment() -> dict[str, str]:
    environment = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    environment.pop("CUDA_VISIBLE_DEVICES", None)
    return environment


def _per_step(run: Path) -> dict[int, list[dict]]:
    """Each step's rows of sample_weights.jsonl (every rank's samples, rank by rank); a resumed step's last rows."""
    steps: dict[int, list[dict]] = {}
    previous = None
    for line in (run / "sample_weights.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["step"] != previous:  # a new block: a step written again after the resume replaces the old one
            steps[row["step"]] = []
            previous = row["step"]
        steps[row["step"]].append(row)
    return steps


def _keys_of_an_uninterrupted_run(raw: dict, processes: int) -> dict[int, list[str]]:
    """Each step's sample keys, rank by rank, from the training streams built as the loop builds them."""
    config = config_from_dict(raw)
    per_rank = []
    for rank in range(processes):
        stream = build_train_stream(config.data.train, config.data, image_size=16, image_mean=(0.5,) * 3,
                                    image_std=(0.5,) * 3, tokenizer=lambda texts: torch.zeros(len(texts), 4),
                                    batch_size=config.train.batch_size // processes, rank=rank,
                                    world_size=processes, seed=config.seed, split="train")
        batches = []
        while len(batches) < STEPS:
            batches.extend(batch.keys for batch in stream)
        per_rank.append(batches)
    return {step: [key for keys in per_rank for key in keys[step - 1]] for step in range(1, STEPS + 1)}


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_finite_shards_resume_mid_epoch_with_the_samples_of_an_uninterrupted_run(finite_shards, tmp_path, processes):
    """The steps after the resume see the keys of an uninterrupted run; with one process (where a
    reference run is cheap) also its losses and weights, which need the meta stream resumed exactly too."""
    raw = _finite_config(finite_shards, tmp_path / "resumed")
    (tmp_path / "resumed.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "reference.yaml").write_text(yaml.safe_dump({**raw, "output_dir": str(tmp_path / "reference")}))
    environment = _environment()

    # stderr to files: a pipe nobody reads while the runs train could fill up and stall them
    logs = {name: open(tmp_path / f"{name}.stderr", "w+") for name in ("killed", "reference")}
    killed = subprocess.Popen(_launch(tmp_path / "resumed.yaml", processes), stdout=subprocess.DEVNULL,
                              stderr=logs["killed"], env=environment)
    reference = None
    if processes == 1:  # the uninterrupted run trains alongside
        reference = subprocess.Popen(_launch(tmp_path / "reference.yaml", processes), stdout=subprocess.DEVNULL,
                                     stderr=logs["reference"], env=environment)
    deadline = time.time() + 180
    while not list_checkpoints(tmp_path / "resumed"):
        assert killed.poll() is None, (tmp_path / "killed.stderr").read_text()[-3000:]
        assert time.time() < deadline, "no checkpoint within 180 s"
        time.sleep(0.02)
    # the launcher and every training process (torchrun starts its workers in sessions of their own)
    tree = psutil.Process(killed.pid)
    for process in [tree, *tree.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(signal.SIGKILL)
    killed.wait()
    checkpoint = list_checkpoints(tmp_path / "resumed")[-1]
    step_at_kill = int(checkpoint.name.split("_")[1])
    assert step_at_kill < STEPS and step_at_kill % (6 * processes), "the kill should fall in the middle of an epoch"
    for rank in range(processes):
        position = json.loads((checkpoint / f"data_position_{rank}.json").read_text())
        assert set(position) == {"train", "meta"} and position["train"]["batch"] > 0

    resumed = subprocess.run(_launch(tmp_path / "resumed.yaml", processes, "train.resume=latest"),
                             capture_output=True, text=True, env=environment, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((tmp_path / "resumed" / "summary.json").read_text())["resumed_from_step"] == step_at_kill
    got = _per_step(tmp_path / "resumed")  # the killed run's steps up to its checkpoint, then the resumed run's
    expected_keys = _keys_of_an_uninterrupted_run(raw, processes)
    assert {step: [row["key"] for row in rows] for step, rows in got.items()} == expected_keys

    if reference is not None:
        assert reference.wait(timeout=300) == 0, (tmp_path / "reference.stderr").read_text()[-3000:]
        expected = _per_step(tmp_path / "reference")
        assert {step: [row["key"] for row in rows] for step, rows in expected.items()} == expected_keys
        for step in range(step_at_kill + 1, STEPS + 1):
            # the same meta batches too: the WeightNet, and so every weight and loss, follows the same path.
            # The same ops in the same order on one CPU thread: equal to the last bit (a meta stream that
            # restarted with a fresh epoch moves the weights by ~1e-5 at the first step after the resume)
            for name in ("loss", "weight"):
                assert [row[name] for row in got[step]] == pytest.approx(
                    [row[name] for row in expected[step]], rel=2e-7, abs=1e-9), f"step {step}: {name}"
    for log in logs.values():
        log.close()


def _losses(run: Path) -> dict[int, float]:
    return {row["step"]: row["loss/total"] for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "loss/total" in row}


def test_cam_softmax_schedule_resumes_exactly(finite_shards, tmp_path):
    """Cam-Softmax's c is a function of the training step: a resumed run continues the schedule, so its
    losses after the resume are those of a run never stopped (c moves every step here, meta weighting on)."""
    raw = _finite_config(finite_shards, tmp_path / "uninterrupted")
    raw["data"]["workers"] = 0
    raw["loss"] = {"terms": {"cam_softmax": {"weight": 1.0, "c_start": 1.5707, "c_stop": 0.6, "c_decay": 0.08}}}
    # a warmup longer than the run: the learning rate of a step does not depend on max_steps
    raw["train"].update(max_steps=8, checkpoint_every=4, log_every=1, warmup_steps=50)
    uninterrupted = config_from_dict(raw)
    from mmsphere.train import train
    train(uninterrupted)
    stopped = dict(raw, output_dir=str(tmp_path / "resumed"), train={**raw["train"], "max_steps": 4})
    train(config_from_dict(stopped))
    resumed = dict(stopped, train={**raw["train"], "resume": "latest"})
    summary = train(config_from_dict(resumed))
    assert summary["resumed_from_step"] == 4 and summary["steps"] == 8
    expected, got = _losses(tmp_path / "uninterrupted"), _losses(tmp_path / "resumed")
    assert sorted(expected) == list(range(1, 9))
    for step in range(5, 9):
        assert got[step] == pytest.approx(expected[step], rel=1e-6), f"step {step}"
