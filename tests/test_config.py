"""The typed config tree: YAML + overrides, unknown keys with suggestions, types and impossible values."""

from __future__ import annotations

import math

import pytest

from mmsphere.config import Config, ConfigError, config_from_dict, config_to_dict, load_config, save_config

GOOD = {
    "output_dir": "runs/x",
    "data": {"train": [{"urls": "a-{000..001}.tar", "modality": "video"}],
             "meta": {"urls": "m.tar", "modality": "image"}},
    "loss": {"terms": {"angular_margin": 1.0, "m2mix": 0.1}, "margin": 0.2},
    "meta": {"enabled": True, "interval": 5},
    "train": {"max_steps": 10, "batch_size": 8, "betas": [0.9, 0.95]},
}


def test_builds_typed_tree():
    config = config_from_dict(GOOD)
    assert isinstance(config, Config)
    assert config.data.train[0].urls == "a-{000..001}.tar"
    assert config.loss.margin == 0.2 and isinstance(config.train.lr, float)
    assert config.train.betas == (0.9, 0.95)
    assert config.meta.interval == 5


def test_round_trip_through_yaml(tmp_path):
    config = config_from_dict(GOOD)
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config
    assert config_to_dict(config)["train"]["betas"] == [0.9, 0.95]


def test_overrides_are_parsed_by_type(tmp_path):
    path = tmp_path / "c.yaml"
    save_config(config_from_dict(GOOD), path)
    config = load_config(path, ["train.max_steps=3", "loss.margin=0.3", "train.lr=2e-3", "train.resume=latest", "meta.enabled=false",
                                "loss.terms={clip: 1.0}"])
    assert config.train.max_steps == 3 and config.loss.margin == 0.3
    assert config.train.lr == 2e-3  # YAML 1.1 reads 2e-3 as a string
    assert config.train.resume == "latest" and config.meta.enabled is False
    assert config.loss.terms == {"clip": 1.0}


@pytest.mark.parametrize("key, suggestion", [("train.max_step", "train.max_steps"), ("loss.margn", "loss.margin"),
                                             ("meta.intervall", "meta.interval"), ("outputdir", "output_dir")])
def test_unknown_key_suggests_closest(key, suggestion):
    raw = {"data": GOOD["data"]}
    section, _, leaf = key.rpartition(".")
    (raw.setdefault(section, {}) if section else raw)[leaf] = 1
    with pytest.raises(ConfigError, match=f"unknown config key {key}.*did you mean {suggestion}"):
        config_from_dict(raw)


@pytest.mark.parametrize("override, message", [
    ("loss.margin=-0.1", r"loss.margin=-0.1 must be in \[0, π\)"),
    (f"loss.margin={math.pi}", "loss.margin"),
    ("data.frames=0", "data.frames=0"),
    ("train.batch_size=1", "train.batch_size=1"),
    ("train.max_steps=ten", "train.max_steps='ten' must be an integer"),
    ("train.lr=fast", "train.lr='fast' must be a number"),
    ("meta.enabled=yes please", "meta.enabled='yes please' must be true or false"),
    ("loss.terms={clip: 1.0, angular_margin: 1.0}", "exactly one of"),
    ("loss.terms={angular_margn: 1.0}", "did you mean angular_margin"),
    ("train.precision=fp8", "train.precision"),
    ("meta.params=everything", "meta.params"),
    ("train.accum_freq=3", "divisible by train.accum_freq"),
    ("loss={local_loss: true, gather_with_grad: false}", "loss.local_loss=true needs loss.gather_with_grad=true"),
])
def test_impossible_values_fail_fast(tmp_path, override, message):
    path = tmp_path / "c.yaml"
    save_config(config_from_dict(GOOD), path)
    with pytest.raises(ConfigError, match=message):
        load_config(path, [override])


def test_meta_enabled_needs_meta_set():
    raw = {"data": {"train": GOOD["data"]["train"]}, "meta": {"enabled": True}}
    with pytest.raises(ConfigError, match="data.meta"):
        config_from_dict(raw)


def test_missing_or_malformed_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_config(None, ["train.max_steps"])
