"""save_run / load_run: the run directory restores the same model, and refuses what it cannot restore."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

import mmsphere
from mmsphere.config import config_to_dict
from mmsphere.errors import ConfigError, MmsphereError
from mmsphere.models.config import ModelConfig
from mmsphere.train.config import Config, load_config
from mmsphere.models import load_run, save_run

CAPTIONS = ["a cat on a mat", "a red car", "two dogs in the snow"]
RUN_FILES = ["config.yaml", "mmsphere.json", "model.safetensors"]


@pytest.fixture
def trained(make_model, perturb):
    """A transformer-head model whose every parameter moved away from its initialisation."""
    model = make_model(seed=21, temporal_head="transformer", max_frames=8, freeze_text=True)
    perturb(model, seed=22, std=0.01)
    perturb(model.temporal, seed=23, std=0.2)
    with torch.no_grad():
        model.log_logit_scale.fill_(3.0)
    config = Config(output_dir="runs/test", seed=5, model=model.config)
    config.train.max_steps = 7
    return model, config


def test_round_trip_restores_outputs_config_and_preprocessing(trained, random_frames, tmp_path):
    model, config = trained
    model.image_mean, model.image_std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    save_run(model, config, tmp_path / "run")
    assert sorted(path.name for path in (tmp_path / "run").iterdir()) == RUN_FILES

    restored = mmsphere.load(str(tmp_path / "run"))
    assert restored.run_config == config_to_dict(config) and restored.config == model.config
    assert not restored.training
    assert restored.image_mean == (0.5, 0.5, 0.5) and restored.image_std == (0.25, 0.25, 0.25)
    for (name, expected), (restored_name, actual) in zip(model.state_dict().items(), restored.state_dict().items()):
        assert name == restored_name and torch.equal(actual, expected), name
    text_parameters = [p for name, p in restored.named_parameters() if restored.tower_of(name) == "text"]
    assert not any(parameter.requires_grad for parameter in text_parameters)

    model.eval()
    text, frames = model.tokenizer(CAPTIONS), random_frames(3, 4)
    mask = torch.tensor([[True] * 4, [True, True, False, False], [True, False, False, False]])
    with torch.no_grad():
        expected, actual = model(text, frames=frames, frame_mask=mask), restored(text, frames=frames, frame_mask=mask)
    for name in ("image_features", "text_features", "logit_scale"):
        assert torch.equal(actual[name], expected[name]), name


def test_info_file_records_format_and_versions(trained, tmp_path):
    model, config = trained
    save_run(model, config, tmp_path)
    info = json.loads((tmp_path / "mmsphere.json").read_text())
    assert info["format_version"] == 1 and info["mmsphere_version"] == mmsphere.__version__
    assert info["image_size"] == 32 and info["embed_dim"] == 32
    assert load_config(tmp_path / "config.yaml") == config


def test_saving_again_replaces_files_and_leaves_no_temporaries(trained, tmp_path):
    model, config = trained
    (tmp_path / "train.log").write_text("kept\n")
    save_run(model, config, tmp_path)
    with torch.no_grad():
        model.log_logit_scale.fill_(1.5)
    save_run(model, config, tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == RUN_FILES + ["train.log"]
    assert load_run(tmp_path).log_logit_scale.item() == 1.5


def test_save_run_refuses_a_config_describing_another_model(trained, tmp_path):
    model, config = trained
    with pytest.raises(TypeError, match="save_run takes a DualEncoder, got Sequential; unwrap"):
        save_run(torch.nn.Sequential(model), config, tmp_path)
    config.model = ModelConfig(name="mmsphere-tiny", temporal_head="mean")
    with pytest.raises(ValueError, match="config.model differs from the model's own config in temporal_head"):
        save_run(model, config, tmp_path)
    assert not (tmp_path / "model.safetensors").exists()


def test_missing_run_directory_and_files(trained, tmp_path):
    with pytest.raises(FileNotFoundError, match="run directory .*absent.* does not exist"):
        load_run(tmp_path / "absent")
    model, config = trained
    save_run(model, config, tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="has no model.safetensors"):
        load_run(tmp_path)


def test_incompatible_format_version(trained, tmp_path):
    model, config = trained
    save_run(model, config, tmp_path)
    info = json.loads((tmp_path / "mmsphere.json").read_text())
    (tmp_path / "mmsphere.json").write_text(json.dumps({**info, "format_version": 3, "mmsphere_version": "9.0"}))
    message = r"mmsphere.json' has format_version=3 \(written by mmsphere 9.0\).*reads format_version=1 and 2"
    with pytest.raises(MmsphereError, match=message):
        load_run(tmp_path)
    # format 2 is a frozen-tower run's (trained tensors + a frozen-base reference): without its reference it is damaged
    (tmp_path / "mmsphere.json").write_text(json.dumps({**info, "format_version": 2}))
    with pytest.raises(MmsphereError, match="is damaged: format_version=2 goes with a 'frozen_base' reference"):
        load_run(tmp_path)


def test_weights_that_do_not_match_the_config(trained, tmp_path):
    model, config = trained
    save_run(model, config, tmp_path)
    raw = yaml.safe_load((tmp_path / "config.yaml").read_text())
    raw["model"]["temporal_layers"] = 2
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(raw))
    message = r"model.safetensors' does not match the model described by .*config.yaml.*missing .* temporal.blocks.1"
    with pytest.raises(MmsphereError, match=message):
        load_run(tmp_path)


def test_invalid_config_names_the_file(trained, tmp_path):
    model, config = trained
    save_run(model, config, tmp_path)
    raw = yaml.safe_load((tmp_path / "config.yaml").read_text())
    raw["model"]["temporal_haed"] = "mean"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(raw))
    message = r"config.yaml'.*unknown config key model.temporal_haed; did you mean model.temporal_head"
    with pytest.raises(ConfigError, match=message):
        load_run(tmp_path)


def test_truncated_weights_are_named(trained, tmp_path):
    model, config = trained
    save_run(model, config, tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:64])
    with pytest.raises(MmsphereError, match="cannot read safetensors file .*model.safetensors"):
        load_run(tmp_path)
