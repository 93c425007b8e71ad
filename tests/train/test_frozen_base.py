"""Checkpoints hold what was trained (issue 23): a frozen-tower run saves its trained tensors and a base reference.

A heads-only run on a pretrained base writes, in every checkpoint and in its run directory, only the
tensors training changes plus a reference to the base (source, config, digest); loading rebuilds the
base from its source, checks the digest and puts the trained tensors on top. A run on a random base
keeps saving everything. Real models, real files, real training runs of the tiny model.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from mmsphere.errors import DataError
from mmsphere.models import create_model, export_run, load_run, save_run
from mmsphere.models.config import ModelConfig
from mmsphere.models.frozen_base import base_sha256
from mmsphere.models.run_dir import load_dual_encoder
from mmsphere.train import train
from mmsphere.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from mmsphere.train.config import Config, config_from_dict

from .conftest import tiny_config

HEADS = {"clip.visual.proj", "clip.text_projection", "clip.logit_scale"}  # what mmsphere-tiny trains with heads


def _write_base(path: Path, name: str = "mmsphere-tiny", seed: int = 5) -> Path:
    """An open_clip weights file of a seeded model: the pretrained source of the runs below."""
    torch.manual_seed(seed)
    source = create_model(ModelConfig(name=name))
    save_file({key: value.contiguous() for key, value in source.clip.state_dict().items()}, str(path))
    return path


def _trained_in_memory(base: Path, name: str = "mmsphere-tiny", **fields) -> torch.nn.Module:
    """A heads-only model on ``base`` whose trainable parameters (and trainable buffers) moved, as after training."""
    model = create_model(ModelConfig(name=name, pretrained=str(base), trainable="heads", **fields))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model


def _assert_same_tensors(expected: torch.nn.Module, got: torch.nn.Module) -> None:
    """Every parameter and buffer (the whole state dict) equal, name for name."""
    want, have = expected.state_dict(), got.state_dict()
    assert list(want) == list(have)
    for name, value in want.items():
        assert torch.equal(value, have[name]), name


def _frozen_base_run(shards, root: Path, base: Path, **train_fields) -> dict:
    # finite shards (resampled: false): a resume continues the epoch at the very next batch
    return tiny_config(shards, root, model={"name": "mmsphere-tiny", "pretrained": str(base), "trainable": "heads"},
                       data={"resampled": False},
                       train={"max_steps": 4, "checkpoint_every": 2, "keep_checkpoints": 5, **train_fields})


# ------------------------------------------------------------------------------------------
# (1) a heads-only run on a pretrained base saves the trained tensors + the reference, and loads whole


def test_a_heads_only_run_saves_only_the_trained_tensors_and_a_reference(image_text_shards, tmp_path, caplog):
    base = _write_base(tmp_path / "base.safetensors")
    caplog.set_level(logging.INFO, logger="mmsphere")
    train(config_from_dict(_frozen_base_run(image_text_shards, tmp_path / "run", base)))
    run = tmp_path / "run"
    assert any("trained tensors only" in record.getMessage() and str(base) in record.getMessage()
               for record in caplog.records)
    base_tensors = load_file(str(base))

    for checkpoint in list_checkpoints(run):
        assert set(load_file(str(checkpoint / "model.safetensors"))) == HEADS
        reference = json.loads((checkpoint / "model.frozen_base.json").read_text())
        assert reference["pretrained"] == str(base) and reference["name"] == "mmsphere-tiny"
        assert reference["model_config"]["trainable"] == "heads" and len(reference["sha256"]) == 64
    trained = load_file(str(run / "model.safetensors"))
    assert set(trained) == HEADS
    info = json.loads((run / "mmsphere.json").read_text())
    assert info["format_version"] == 2 and info["frozen_base"]["pretrained"] == str(base)
    assert info["frozen_base"]["sha256"] == reference["sha256"]
    # far smaller than the model: the frozen towers are not in it
    assert (run / "model.safetensors").stat().st_size * 10 < base.stat().st_size

    model = load_run(run)
    for name, value in model.state_dict().items():
        if name in HEADS:
            assert torch.equal(value, trained[name]), name
        elif name.startswith("clip."):
            assert torch.equal(value, base_tensors[name.removeprefix("clip.")]), name
    assert not torch.equal(model.clip.visual.proj, base_tensors["visual.proj"])  # the run did train the heads


@pytest.mark.parametrize("name", ["mmsphere-tiny", "mmsphere-tiny-rn"])  # the ResNet has frozen BatchNorm buffers
def test_the_run_dir_and_checkpoint_load_the_trained_model_exactly(tmp_path, name):
    base = _write_base(tmp_path / "base.safetensors", name)
    model = _trained_in_memory(base, name, temporal_head="transformer")
    config = Config(model=model.config)
    save_run(model, config, tmp_path / "run")
    # the trainable parameters and the temporal head: no frozen tower weight, no frozen BatchNorm statistic
    trainable = {key for key, parameter in model.named_parameters() if parameter.requires_grad}
    temporal = {key for key in model.state_dict() if key.startswith("temporal.")}
    assert set(load_file(str(tmp_path / "run" / "model.safetensors"))) == trainable | temporal
    if name == "mmsphere-tiny-rn":
        assert any(key.endswith("running_mean") for key in model.state_dict())
    _assert_same_tensors(model, load_run(tmp_path / "run"))

    accelerator = Accelerator(cpu=True)
    path = save_checkpoint(accelerator, tmp_path / "out", 1, {"data_epoch": 0}, {"model": model}, keep=1)
    fresh = create_model(model.config)  # what a resumed run builds from its config
    load_checkpoint(accelerator, path, {"model": fresh})
    _assert_same_tensors(model, fresh)


# ------------------------------------------------------------------------------------------
# (2) resume from a trimmed checkpoint continues as if never stopped


def test_resume_from_a_trimmed_checkpoint_matches_an_uninterrupted_run(image_text_shards, tmp_path):
    base = _write_base(tmp_path / "base.safetensors")
    # a warmup longer than the run: the learning rate of each step does not depend on max_steps
    train(config_from_dict(_frozen_base_run(image_text_shards, tmp_path / "whole", base, warmup_steps=8)))
    stopped = _frozen_base_run(image_text_shards, tmp_path / "stopped", base, warmup_steps=8, max_steps=2)
    train(config_from_dict(stopped))
    assert (list_checkpoints(tmp_path / "stopped")[-1] / "model.frozen_base.json").is_file()
    resumed = _frozen_base_run(image_text_shards, tmp_path / "stopped", base, warmup_steps=8, resume="latest")
    summary = train(config_from_dict(resumed))
    assert summary["resumed_from_step"] == 2 and summary["steps"] == 4
    whole, continued = load_run(tmp_path / "whole"), load_run(tmp_path / "stopped")
    _assert_same_tensors(whole, continued)
    assert not torch.equal(whole.clip.visual.proj, load_file(str(base))["visual.proj"])


# ------------------------------------------------------------------------------------------
# (3) a base that changed or moved stops the load with one line naming it


@pytest.mark.parametrize("what", ["changed", "deleted"])
def test_a_changed_or_missing_base_is_one_clear_error(tmp_path, what):
    base = _write_base(tmp_path / "base.safetensors")
    model = _trained_in_memory(base)
    save_run(model, Config(model=model.config), tmp_path / "run")
    expected = json.loads((tmp_path / "run" / "mmsphere.json").read_text())["frozen_base"]["sha256"]
    accelerator = Accelerator(cpu=True)
    checkpoint = save_checkpoint(accelerator, tmp_path / "out", 1, {"data_epoch": 0}, {"model": model}, keep=1)
    if what == "changed":
        other = _write_base(tmp_path / "other.safetensors", seed=6)
        shutil.copyfile(other, base)
    else:
        base.unlink()

    with pytest.raises(DataError) as caught:
        load_run(tmp_path / "run")
    message = str(caught.value)
    assert "\n" not in message and str(base) in message and expected[:12] in message
    assert "put the original base weights back" in message or "put that base back" in message
    if what == "changed":
        found = create_model(ModelConfig(name="mmsphere-tiny", pretrained=str(base), trainable="heads"))
        assert f"has sha256 {base_sha256(found)[:12]}" in message
        # resuming on the changed base: the run's own model is built on it, the checkpoint refuses it
        with pytest.raises(DataError, match=rf"checkpoint .*{expected[:12]}.*put the original base weights back"):
            load_checkpoint(accelerator, checkpoint, {"model": found})
    else:
        assert "found none" in message


# ------------------------------------------------------------------------------------------
# (4) a random base cannot be rebuilt: everything is saved, as before


def test_a_random_init_heads_only_run_still_saves_everything(image_text_shards, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="mmsphere")
    raw = tiny_config(image_text_shards, tmp_path / "run", model={"name": "mmsphere-tiny", "trainable": "heads"},
                      train={"max_steps": 2})
    train(config_from_dict(raw))
    run = tmp_path / "run"
    assert [record.getMessage() for record in caplog.records if "hold the full weights" in record.getMessage()]
    torch.manual_seed(0)
    every_name = set(create_model(ModelConfig(name="mmsphere-tiny")).state_dict())
    for checkpoint in list_checkpoints(run):
        assert set(load_file(str(checkpoint / "model.safetensors"))) == every_name
        assert not (checkpoint / "model.frozen_base.json").exists()
    assert set(load_file(str(run / "model.safetensors"))) == every_name
    info = json.loads((run / "mmsphere.json").read_text())
    assert info["format_version"] == 1 and "frozen_base" not in info

    torch.manual_seed(1)
    model = create_model(ModelConfig(name="mmsphere-tiny", trainable="heads"))
    with torch.no_grad():
        model.clip.visual.proj.add_(1.0)
    save_run(model, Config(model=model.config), tmp_path / "saved")
    _assert_same_tensors(model, load_run(tmp_path / "saved"))


# ------------------------------------------------------------------------------------------
# (5) export of a trimmed run is a complete open_clip directory


def test_export_of_a_trimmed_run_writes_every_tower_tensor(tmp_path):
    base = _write_base(tmp_path / "base.safetensors")
    model = _trained_in_memory(base)
    save_run(model, Config(model=model.config), tmp_path / "run")
    export_run(tmp_path / "run", tmp_path / "export")
    exported = load_file(str(tmp_path / "export" / "open_clip_model.safetensors"))
    expected = {name.removeprefix("clip."): value for name, value in model.state_dict().items()
                if name.startswith("clip.")}
    assert set(exported) == set(expected)
    for name, value in expected.items():
        assert torch.equal(exported[name], value), name


def test_a_base_saved_again_still_matches(tmp_path):
    base = _write_base(tmp_path / "base.safetensors")
    model = _trained_in_memory(base)
    save_run(model, Config(model=model.config), tmp_path / "run")
    # the same tensors saved again, in reverse order with other metadata: another file, the same content
    before = base.read_bytes()
    tensors = {name: value.clone() for name, value in reversed(list(load_file(str(base)).items()))}
    save_file(tensors, str(base), metadata={"saved": "again"})
    assert base.read_bytes() != before
    _assert_same_tensors(model, load_run(tmp_path / "run"))


def test_a_trimmed_weights_file_is_no_pretrained_source(tmp_path):
    base = _write_base(tmp_path / "base.safetensors")
    model = _trained_in_memory(base)
    save_run(model, Config(model=model.config), tmp_path / "run")
    with pytest.raises(DataError, match="holds only the trained tensors of a frozen-tower run"):
        create_model(ModelConfig(name="mmsphere-tiny", pretrained=str(tmp_path / "run" / "model.safetensors")))


def test_the_evaluation_identity_of_a_trimmed_run_names_its_base(tmp_path):
    base = _write_base(tmp_path / "base.safetensors")
    model = _trained_in_memory(base)
    save_run(model, Config(model=model.config), tmp_path / "run")
    loaded, identity = load_dual_encoder(tmp_path / "run")
    assert identity["frozen_base_sha256"] == base_sha256(model)
    _assert_same_tensors(model, loaded)
