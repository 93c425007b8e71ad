"""The trainer state a checkpoint keeps: the run's counters, and refusal of a state that lacks a key or mistypes one.

A run stopped after a checkpoint and resumed reports in summary.json what a run never stopped
reports: its skipped steps, meta iterations and samples count the whole run, each once. A
``trainer_state.json`` that is valid JSON but misses a key or holds one of the wrong type stops the
resume with one line naming the file and the key, never a traceback from inside the loop.
"""

from __future__ import annotations

import dataclasses

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
import yaml
from accelerate import Accelerator

from mmsphere.cli import run_command
from mmsphere.train.config import config_from_dict
from mmsphere.errors import DataError
from mmsphere.train import loop, train
from mmsphere.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint

from .conftest import tiny_config, write_image_text_shards

POISONED = (1, 3)  # the first try of these steps sees NaN images: a non-finite loss, and a skipped meta iteration
CHECKPOINT = 2  # the killed run's last checkpoint; it is killed trying step 3, mid-epoch


class Killed(BaseException):
    """Stands for SIGKILL: nothing in the loop handles it."""


@pytest.fixture(scope="module")
def damaged_shards(tmp_path_factory, image_text_shards) -> dict[str, str]:
    """Train shards each beginning with an unknown member, an image that is not one and a duplicate key."""
    root = tmp_path_factory.mktemp("damaged")
    write_image_text_shards(root / "clean", "train", shards=4, per_shard=24, seed=5)
    for shard in range(4):
        with tarfile.open(root / "clean" / f"train-{shard:06d}.tar") as clean:
            members = [(member.name, clean.extractfile(member).read()) for member in clean.getmembers()]
        bad = [(f"junk{shard}.pth", b"never decoded"), (f"bad{shard}.jpg", b"not an image"),
               (f"bad{shard}.txt", b"a broken image"), *members[:2], *members[:2]]  # the first sample twice
        with tarfile.open(root / f"train-{shard:06d}.tar", "w") as damaged:
            for name, data in bad + members[2:]:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                damaged.addfile(info, io.BytesIO(data))
    return {"train": str(root / "train-{000000..000003}.tar"), "meta": image_text_shards["meta"]}


def _raw(shards: dict[str, str], run: Path, **train_section) -> dict:
    # finite shards resume at the very next batch; 6 batches of 8 make an epoch, the 4 steps and 2 skipped ones take it
    return tiny_config(shards, run, data={"resampled": False}, meta={"enabled": True, "interval": 1, "hidden": 8},
                       train={"max_steps": 4, "checkpoint_every": CHECKPOINT, **train_section})


def _train(raw: dict, poisoned: tuple[int, ...], kill_at: int | None = None) -> None:
    """Train ``raw`` in this process, the first try of each ``poisoned`` step on NaN images; stop trying ``kill_at``."""
    real = loop.optimization_step
    tried: set[int] = set()

    def scripted(*arguments, step, **keywords):
        if step == kill_at:
            raise Killed
        if step in poisoned and step not in tried:
            tried.add(step)
            task, batch, *rest = arguments
            arguments = (task, dataclasses.replace(batch, media=batch.media * float("nan")), *rest)
        return real(*arguments, step=step, **keywords)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "optimization_step", scripted)
        train(config_from_dict(raw))


@pytest.fixture(scope="module")
def killed_run(damaged_shards, tmp_path_factory) -> Path:
    """A run killed after its checkpoint at step 2 (step 1 skipped once), before finishing."""
    run = tmp_path_factory.mktemp("killed") / "run"
    with pytest.raises(Killed):
        _train(_raw(damaged_shards, run), POISONED, kill_at=CHECKPOINT)
    assert [path.name for path in list_checkpoints(run)] == [f"step_{CHECKPOINT:08d}"]
    assert not (run / "summary.json").exists()
    return run


def _copy(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


def _without_timing(summary: dict) -> dict:
    return {key: value for key, value in summary.items() if key not in ("wall_time_s", "resumed_from_step")}


def test_a_resumed_run_reports_the_counters_of_an_uninterrupted_one(damaged_shards, killed_run, tmp_path):
    state = json.loads((list_checkpoints(killed_run)[-1] / "trainer_state.json").read_text())
    assert (state["nonfinite_steps_skipped"], state["meta_iterations_skipped"]) == (1, 1)
    # the resumed stream reads these again to reach its position: they must not count twice
    assert {"unknown_member", "duplicate_key"} <= set(state["skipped_samples"]), state

    reference = tmp_path / "reference"
    _train(_raw(damaged_shards, reference), POISONED)
    expected = json.loads((reference / "summary.json").read_text())
    assert (expected["nonfinite_steps_skipped"], expected["meta_iterations_skipped"]) == (2, 2)
    assert expected["skipped_samples"]["unknown_member"] > state["skipped_samples"]["unknown_member"]

    run = _copy(killed_run, tmp_path / "resumed")
    _train(_raw(damaged_shards, run, resume="latest"), POISONED)
    got = json.loads((run / "summary.json").read_text())
    assert got["resumed_from_step"] == CHECKPOINT
    assert _without_timing(got) == _without_timing(expected)


def test_a_checkpoint_without_counters_resumes_and_says_what_it_counts(damaged_shards, killed_run, tmp_path, caplog):
    """Checkpoints written before the counters were kept still resume; summary.json counts from the resume on."""
    run = _copy(killed_run, tmp_path / "run")
    file = list_checkpoints(run)[-1] / "trainer_state.json"
    state = json.loads(file.read_text())
    for key in ("nonfinite_steps_skipped", "meta_iterations_skipped", "skipped_samples", "max_loss_seen"):
        del state[key]
    file.write_text(json.dumps(state))
    with caplog.at_level("WARNING", logger="mmsphere.train.loop"):
        _train(_raw(damaged_shards, run, resume="latest"), POISONED)
    assert "holds no counters" in caplog.text
    assert json.loads((run / "summary.json").read_text())["nonfinite_steps_skipped"] == 1


# ------------------------------------------------------------------------------------------
# a trainer state that is JSON but not a trainer state


def test_a_trainer_state_without_its_data_epoch_is_refused_in_one_line(killed_run, tmp_path, capsys):
    run = _copy(killed_run, tmp_path / "run")
    file = list_checkpoints(run)[-1] / "trainer_state.json"
    state = json.loads(file.read_text())
    del state["data_epoch"]
    file.write_text(json.dumps(state))
    config = yaml.safe_load((run / "config.yaml").read_text())
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    capsys.readouterr()

    code = run_command("train", ["--config", str(config_path), f"output_dir={run}", "train.resume=latest"])
    stderr = capsys.readouterr().err
    assert code == 2 and "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and str(file) in errors[0] and "'data_epoch'" in errors[0], errors
    assert not (run / "summary.json").exists()


def _objects() -> dict:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return {"model": model, "optimizer": optimizer,
            "scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)}


COUNTERS = {"nonfinite_steps_skipped": 2, "meta_iterations_skipped": 1, "skipped_samples": {"duplicate_key": 3},
            "max_loss_seen": 4.5}


def test_a_complete_trainer_state_comes_back_as_saved(tmp_path):
    accelerator = Accelerator(cpu=True)
    path = save_checkpoint(accelerator, tmp_path, 3, {"data_epoch": 1, **COUNTERS}, _objects(), keep=1)
    state = load_checkpoint(accelerator, path, _objects())
    assert {key: state[key] for key in ("step", "data_epoch", *COUNTERS)} == {"step": 3, "data_epoch": 1, **COUNTERS}


@pytest.mark.parametrize(("key", "value", "says"), [
    ("step", None, "has no 'step'"),
    ("data_epoch", None, "has no 'data_epoch'"),
    ("step", "3", "'step' is \"3\", not a non-negative integer"),
    ("step", 3.0, "'step' is 3.0, not a non-negative integer"),
    ("step", True, "'step' is true, not a non-negative integer"),
    ("data_epoch", -1, "'data_epoch' is -1, not a non-negative integer"),
    ("processes", 0, "'processes' is 0, not a positive integer"),
    ("nonfinite_steps_skipped", [2], "'nonfinite_steps_skipped' is [2], not a non-negative integer"),
    ("meta_iterations_skipped", "1", "'meta_iterations_skipped' is \"1\", not a non-negative integer"),
    ("skipped_samples", {"duplicate_key": "3"}, "'skipped_samples' is {\"duplicate_key\": \"3\"}, not an object of"),
    ("skipped_samples", [3], "'skipped_samples' is [3], not an object of non-negative integers"),
    ("max_loss_seen", "high", "'max_loss_seen' is \"high\", not a finite number"),
])
def test_a_missing_or_mistyped_key_is_refused_naming_the_file_and_the_key(tmp_path, key, value, says):
    accelerator = Accelerator(cpu=True)
    path = save_checkpoint(accelerator, tmp_path, 3, {"data_epoch": 1, **COUNTERS}, _objects(), keep=1)
    file = path / "trainer_state.json"
    state = json.loads(file.read_text())
    if value is None:
        del state[key]
    else:
        state[key] = value
    file.write_text(json.dumps(state))
    with pytest.raises(DataError) as refused:
        load_checkpoint(accelerator, path, _objects())
    message = str(refused.value)
    assert str(file) in message and says in message and "\n" not in message, message


def test_a_trainer_state_that_is_not_an_object_is_refused(tmp_path):
    accelerator = Accelerator(cpu=True)
    path = save_checkpoint(accelerator, tmp_path, 3, {"data_epoch": 1}, _objects(), keep=1)
    (path / "trainer_state.json").write_text("[3, 1]")
    with pytest.raises(DataError, match=r"trainer_state.json is damaged: it holds a JSON list, not an object"):
        load_checkpoint(accelerator, path, _objects())
