"""Resume runs no code from the checkpoint directory, and never resumes silently without its RNG state.

A checkpoint from someone else is data: a pickle payload in any of its files (one that creates a
marker file when unpickled) is refused with one line naming the file, and the marker never appears.
Old checkpoints (accelerate's ``save_state`` layout, ``*.pkl``/``*.bin`` files) resume through the
same ``weights_only`` reader, and are refused the same way when tampered with.
"""

from __future__ import annotations

import json
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from mmsphere.cli import run_command
from mmsphere.train.config import config_from_dict
from mmsphere.errors import DataError
from mmsphere.train import train
from mmsphere.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint

from .conftest import tiny_config

# every file of a meta-weighting run's checkpoint (one process); a new file needs its payload case too
CHECKPOINT_FILES = ("trainer_state.json", "model.safetensors", "optimizer.pt", "scheduler.json",
                    "weight_net.safetensors", "weight_net_optimizer.pt", "rng_state_0.json", "data_position_0.json")
LEGACY_PICKLED_FILES = ("optimizer.bin", "custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl",
                        "custom_checkpoint_2.pkl", "random_states_0.pkl")


class WritesMarker:
    """Unpickled, creates ``marker``: stands for any code a hostile checkpoint would run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def _with_payload(file: Path, marker: Path) -> None:
    """Plant the payload in ``file``: inside its state dict for torch files, as the whole file otherwise."""
    if file.suffix in (".pt", ".bin", ".pkl"):
        # our own test file: trusted, so a full load is fine here
        state = torch.load(file, weights_only=False)
        torch.save({**state, "payload": WritesMarker(marker)} if isinstance(state, dict) else WritesMarker(marker),
                   file)
    else:
        file.write_bytes(pickle.dumps(WritesMarker(marker)))


def test_the_payload_runs_when_unpickled(tmp_path):
    """The guard of every test below: the planted file really would run code if anything unpickled it."""
    file, marker = tmp_path / "optimizer.pt", tmp_path / "ran"
    torch.save({"state": {}, "param_groups": []}, file)
    _with_payload(file, marker)
    torch.load(file, weights_only=False)
    assert marker.exists()


# ------------------------------------------------------------------------------------------
# a real run's checkpoint, resumed through the command line


@pytest.fixture(scope="module")
def trained_run(image_text_shards, tmp_path_factory) -> Path:
    """A 2-step run with meta weighting and its checkpoint at step 2."""
    run = tmp_path_factory.mktemp("checkpoint_safety") / "run"
    raw = tiny_config(image_text_shards, run, meta={"enabled": True, "interval": 1, "hidden": 8},
                      train={"max_steps": 2, "checkpoint_every": 2, "keep_checkpoints": 1})
    train(config_from_dict(raw))
    return run


def _resume(run: Path, capsys) -> tuple[int, list[str]]:
    """Resume ``run`` to step 3 as a user would; returns the exit code and stderr's error lines."""
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["train"]["max_steps"] = 3
    config_path = run.parent / f"{run.name}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    capsys.readouterr()
    code = run_command("train", ["--config", str(config_path), f"output_dir={run}", "train.resume=latest"])
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    return code, [line for line in stderr.splitlines() if "error:" in line]


def test_the_checkpoint_holds_only_the_files_covered_here(trained_run):
    assert sorted(path.name for path in list_checkpoints(trained_run)[-1].iterdir()) == sorted(CHECKPOINT_FILES)


@pytest.mark.parametrize("name", CHECKPOINT_FILES)
def test_a_payload_in_any_file_is_refused_in_one_line_and_never_runs(trained_run, tmp_path, capsys, name):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "summary.json").unlink()
    marker = tmp_path / "payload_ran"
    _with_payload(list_checkpoints(run)[-1] / name, marker)

    code, errors = _resume(run, capsys)
    assert code == 2
    assert len(errors) == 1 and name in errors[0], errors
    assert not marker.exists()
    assert not (run / "summary.json").exists()


def test_an_untouched_checkpoint_resumes(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "summary.json").unlink()
    code, errors = _resume(run, capsys)
    assert code == 0 and not errors
    assert json.loads((run / "summary.json").read_text())["resumed_from_step"] == 2


# ------------------------------------------------------------------------------------------
# the save/load pair on small objects: every part restored exactly, damaged RNG state an error


def _objects(seed: int = 0) -> dict:
    """A model, its optimiser and schedule, a WeightNet and its optimiser, named as the loop names them."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.98))
    weight_net = torch.nn.Linear(1, 1)
    return {"model": model, "optimizer": optimizer,
            "scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (step + 1)),
            "weight_net": weight_net, "weight_net_optimizer": torch.optim.Adam(weight_net.parameters(), lr=1e-3)}


def _train_a_little(objects: dict) -> None:
    for _ in range(3):
        for model, optimizer in (("model", "optimizer"), ("weight_net", "weight_net_optimizer")):
            inputs = torch.randn(5, objects[model][0].in_features if model == "model" else 1)
            objects[model](inputs).sum().backward()
            objects[optimizer].step()
            objects[optimizer].zero_grad()
        objects["scheduler"].step()


def _draws() -> tuple:
    return random.random(), float(np.random.rand()), torch.rand(2).tolist()


def _assert_same_state(expected: dict, got: dict) -> None:
    for name in ("model", "weight_net"):
        for (key, value), other in zip(expected[name].state_dict().items(), got[name].state_dict().values()):
            assert torch.equal(value, other), f"{name}.{key}"
    for name in ("optimizer", "weight_net_optimizer"):
        saved, loaded = expected[name].state_dict(), got[name].state_dict()
        assert saved["param_groups"] == loaded["param_groups"], name
        for index, values in saved["state"].items():
            for key, value in values.items():
                assert torch.equal(value, loaded["state"][index][key]), f"{name}.state[{index}].{key}"
    assert expected["scheduler"].state_dict() == got["scheduler"].state_dict()


@pytest.fixture
def accelerator() -> Accelerator:
    return Accelerator(cpu=True)


def test_save_then_load_restores_every_part_and_every_generator(accelerator, tmp_path):
    objects = _objects()
    _train_a_little(objects)
    path = save_checkpoint(accelerator, tmp_path, 3, {"data_epoch": 1}, objects, keep=2, data_position={"train": 5})
    expected_draws = _draws()

    fresh = _objects(seed=1)
    state = load_checkpoint(accelerator, path, fresh)
    assert state["step"] == 3 and state["data_epoch"] == 1 and state["data_position"] == {"train": 5}
    assert _draws() == expected_draws
    _assert_same_state(objects, fresh)


@pytest.mark.parametrize("damage", ["truncated", "not a generator state", "missing"])
def test_a_damaged_rng_state_stops_the_resume(accelerator, tmp_path, damage):
    objects = _objects()
    path = save_checkpoint(accelerator, tmp_path, 3, {"data_epoch": 0}, objects, keep=2)
    file = path / "rng_state_0.json"
    if damage == "truncated":
        file.write_text(file.read_text()[:100])
    elif damage == "not a generator state":
        file.write_text(json.dumps({**json.loads(file.read_text()), "torch": "00ff"}))
    else:
        file.unlink()
    with pytest.raises(DataError, match="rng_state_0.json"):
        load_checkpoint(accelerator, path, _objects())


# ------------------------------------------------------------------------------------------
# checkpoints written before this format: accelerator.save_state, objects registered as the loop did


def _legacy_checkpoint(accelerator: Accelerator, directory: Path, objects: dict) -> Path:
    model, optimizer = accelerator.prepare(objects["model"], objects["optimizer"])
    accelerator.register_for_checkpointing(objects["scheduler"])
    accelerator.register_for_checkpointing(objects["weight_net"], objects["weight_net_optimizer"])
    path = directory / "checkpoints" / "step_00000003"
    accelerator.save_state(str(path))
    (path / "trainer_state.json").write_text(json.dumps({"step": 3, "data_epoch": 0}))
    return path


@pytest.mark.parametrize("processes", [1, 2])
def test_an_old_checkpoint_resumes_exactly_without_unpickling(accelerator, tmp_path, processes):
    objects = _objects()
    _train_a_little(objects)
    path = _legacy_checkpoint(accelerator, tmp_path, objects)
    assert {"optimizer.bin", "custom_checkpoint_2.pkl", "random_states_0.pkl"} <= {p.name for p in path.iterdir()}
    if processes == 2:  # accelerate saved the DistributedDataParallel wrapper's names
        weights = load_file(path / "model.safetensors")
        save_file({f"module.{key}": value for key, value in weights.items()}, path / "model.safetensors")
    expected_draws = _draws()

    fresh = _objects(seed=1)
    state = load_checkpoint(accelerator, path, fresh)
    assert state["step"] == 3 and state["data_position"] is None
    assert _draws() == expected_draws
    _assert_same_state(objects, fresh)


@pytest.mark.parametrize("name", [*LEGACY_PICKLED_FILES, "model.safetensors"])
def test_a_payload_in_an_old_checkpoint_is_refused_and_never_runs(accelerator, tmp_path, name):
    path = _legacy_checkpoint(accelerator, tmp_path, _objects())
    marker = tmp_path / "payload_ran"
    _with_payload(path / name, marker)
    with pytest.raises(DataError, match=name) as refused:
        load_checkpoint(accelerator, path, _objects())
    assert "\n" not in str(refused.value)
    assert not marker.exists()


def test_a_damaged_rng_state_of_an_old_checkpoint_stops_the_resume(accelerator, tmp_path):
    path = _legacy_checkpoint(accelerator, tmp_path, _objects())
    file = path / "random_states_0.pkl"
    file.write_bytes(file.read_bytes()[:200])
    with pytest.raises(DataError, match="random_states_0.pkl"):
        load_checkpoint(accelerator, path, _objects())
