"""The typed config tree: YAML + overrides, unknown keys with suggestions, types and impossible values."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest

from mmsphere.config import config_to_dict, load_yaml, save_config
from mmsphere.data.config import SourceConfig
from mmsphere.errors import ConfigError
from mmsphere.losses.config import LEGACY_KEYS
from mmsphere.train.config import Config, config_from_dict, load_config

GOOD = {
    "output_dir": "runs/x",
    "data": {"train": [{"urls": "a-{000..001}.tar", "modality": "video"}],
             "meta": {"urls": "m.tar", "modality": "image"}},
    "loss": {"terms": {"angular_margin": {"weight": 1.0, "margin": 0.2}, "m2mix": 0.1}},
    "meta": {"enabled": True, "interval": 5},
    "train": {"max_steps": 10, "batch_size": 8, "betas": [0.9, 0.95]},
}


def test_builds_typed_tree():
    config = config_from_dict(GOOD)
    assert isinstance(config, Config)
    assert config.data.train[0].urls == "a-{000..001}.tar"
    assert config.loss.terms["angular_margin"] == {"weight": 1.0, "margin": 0.2} and isinstance(config.train.lr, float)
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
    config = load_config(path, ["train.max_steps=3", "loss.terms.angular_margin.margin=0.3", "train.lr=2e-3",
                                "train.resume=latest", "meta.enabled=false"])
    assert config.train.max_steps == 3 and config.loss.terms["angular_margin"] == {"weight": 1.0, "margin": 0.3}
    assert config.train.lr == 2e-3  # YAML 1.1 reads 2e-3 as a string
    assert config.train.resume == "latest" and config.meta.enabled is False
    assert load_config(path, ["loss.terms={clip: 1.0}"]).loss.terms == {"clip": 1.0}


@pytest.mark.parametrize("override, key, expected", [
    # string fields take the text as written, including YAML 1.1's boolean and null words
    ("train.precision=no", "train.precision", "no"),
    ("train.precision=fp16", "train.precision", "fp16"),
    ("model.name=on", "model.name", "on"),
    ("model.name=yes", "model.name", "yes"),
    ("output_dir=null", "output_dir", "null"),
    ("output_dir=runs/a b: c # d", "output_dir", "runs/a b: c # d"),
    ("model.name='quoted'", "model.name", "quoted"),
    ("train.resume=true", "train.resume", "true"),
    ("train.resume=off", "train.resume", "off"),
    # a nullable string takes null / none / ~ / nothing as None, and quotes for the word itself
    ("model.pretrained=null", "model.pretrained", None),
    ("model.pretrained=None", "model.pretrained", None),
    ("model.pretrained=~", "model.pretrained", None),
    ("model.pretrained=", "model.pretrained", None),
    ("model.pretrained='none'", "model.pretrained", "none"),
    ("model.pretrained=laion2b_s34b_b79k", "model.pretrained", "laion2b_s34b_b79k"),
    # other nullable fields
    ("train.grad_clip=null", "train.grad_clip", None),
    ("data.image_size=NULL", "data.image_size", None),
    ("data.image_size=64", "data.image_size", 64),
    ("data.val=null", "data.val", None),
    # bools take true/false, yes/no, on/off in any case
    ("meta.enabled=yes", "meta.enabled", True),
    ("meta.enabled=On", "meta.enabled", True),
    ("meta.enabled=TRUE", "meta.enabled", True),
    ("meta.enabled=no", "meta.enabled", False),
    ("meta.enabled=off", "meta.enabled", False),
    ("meta.enabled=False", "meta.enabled", False),
    # numbers, and YAML for lists, mappings and sections
    ("seed=-3", "seed", -3),
    ("train.lr=1e-4", "train.lr", 1e-4),
    ("train.weight_decay=1", "train.weight_decay", 1.0),
    ("train.betas=[0.8, 0.9]", "train.betas", (0.8, 0.9)),
    ("loss.terms.m2mix=0.5", "loss.terms", {"angular_margin": 1.0, "m2mix": 0.5}),
])
def test_overrides_take_the_declared_type_of_their_field(override, key, expected):
    config = load_config(None, ["data.train=[{urls: a.tar}]", "data.meta={urls: m.tar}", "data.val={urls: v.tar}",
                                "loss.terms={angular_margin: 1.0}", override])
    value = config
    for part in key.split("."):
        value = getattr(value, part)
    assert value == expected and type(value) is type(expected)


def test_yaml_files_keep_no_and_on_as_strings_for_string_fields(tmp_path):
    """YAML 1.2 booleans: ``precision: no`` is accelerate's 'no', while bool fields still take yes/no."""
    path = tmp_path / "c.yaml"
    path.write_text("model: {name: off, freeze_image: yes, freeze_text: off}\n"
                    "data: {train: [{urls: a.tar}], resampled: no}\n"
                    "meta: {enabled: false}\ntrain: {precision: no}\n")
    config = load_config(path)
    assert config.train.precision == "no" and config.model.name == "off"
    assert config.model.freeze_image is True and config.model.freeze_text is False
    assert config.data.resampled is False and config.meta.enabled is False
    save_config(config, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == config


@pytest.mark.parametrize("text, message", [
    # true/false unquoted are booleans, and a string field will not guess which word was meant
    ("train: {precision: false}", r"train.precision=False must be a string; .* in quotes"),
    ("model: {name: true}", r"model.name=True must be a string"),
    ("meta: {enabled: maybe}", r"meta.enabled='maybe' must be true or false"),
])
def test_yaml_booleans_in_string_fields_ask_for_quotes(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError, match=message):
        load_config(path)


@pytest.mark.parametrize("override, message", [
    ("train.max_steps=3.5", r"train.max_steps='3.5' must be an integer"),
    ("train.max_steps=yes", r"train.max_steps='yes' must be an integer"),
    ("train.max_steps=null", r"train.max_steps='null' must be an integer"),
    ("model.image_lr=off", r"model.image_lr='off' must be a number"),
    ("train.grad_clip=none please", r"train.grad_clip='none please' must be a number"),
    ("meta.enabled=1", r"meta.enabled='1' must be true or false"),
    ("meta.enabled=", r"meta.enabled='' must be true or false"),
    ("train.precision=off", r"train.precision='off' must be 'no', 'bf16' or 'fp16'"),
    ("train.betas=[0.9, 0.98", r"override train.betas='\[0.9, 0.98' is not valid YAML"),
])
def test_override_type_errors_name_the_key_and_value(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["data.train=[{urls: a.tar}]", override])


@pytest.mark.parametrize("key, suggestion", [("train.max_step", "train.max_steps"), ("loss.local_los", "loss.local_loss"),
                                             ("meta.intervall", "meta.interval"), ("outputdir", "output_dir")])
def test_unknown_key_suggests_closest(key, suggestion):
    raw = {"data": GOOD["data"]}
    section, _, leaf = key.rpartition(".")
    (raw.setdefault(section, {}) if section else raw)[leaf] = 1
    with pytest.raises(ConfigError, match=f"unknown config key {key}.*did you mean {suggestion}"):
        config_from_dict(raw)


@pytest.mark.parametrize("override, message", [
    ("loss.terms.angular_margin.margin=-0.1", r"loss.terms.angular_margin.margin=-0.1 must be in \[0, π\)"),
    (f"loss.terms.angular_margin.margin={math.pi}", "loss.terms.angular_margin.margin"),
    ("data.frames=0", "data.frames=0"),
    ("train.batch_size=1", "train.batch_size=1"),
    ("train.max_steps=ten", "train.max_steps='ten' must be an integer"),
    ("train.lr=fast", "train.lr='fast' must be a number"),
    ("meta.enabled=yes please", "meta.enabled='yes please' must be true or false"),
    ("loss.terms={clip: 1.0, angular_margin: 1.0}", "exactly one contrastive term"),
    ("loss.terms={angular_margn: 1.0}", "did you mean 'angular_margin'"),
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


@pytest.mark.parametrize("path", sorted(str(path) for path in Path(__file__).resolve().parents[1].glob("configs/**/*.yaml")))
def test_every_shipped_config_loads_and_builds_its_objective(path):
    from mmsphere.losses import Objective

    config = load_config(path)
    assert Objective(config.loss).contrastive in ("clip", "angular_margin", "siglip")


@pytest.mark.parametrize("path", sorted(str(path) for path in Path(__file__).resolve().parents[1].glob("configs/**/*.yaml")))
def test_shipped_configs_are_in_the_new_form(path, caplog):
    raw = load_yaml(Path(path).read_text())
    assert not set(raw.get("loss", {})) & set(LEGACY_KEYS)
    with caplog.at_level(logging.INFO, logger="mmsphere.losses.config"):
        load_config(path)
    assert not caplog.records  # nothing to migrate


# --------------------------------------------------------------------------------------------
# configs written before per-term fields: the flat loss keys are migrated when the config loads

OLD_FORM = {"terms": {"angular_margin": 1.0, "m2mix": 0.1, "calibrated_uniformity": {"weight": 0.2, "t": 3.0}},
            "margin": 0.2, "m2mix_alpha": 1.5, "tau_mix": 0.1, "calibration_alpha": 0.4, "min_sim": 0.1,
            "max_sim": 0.7, "detach_calibration": False, "local_loss": True}
# written out by hand: where each flat key goes
NEW_FORM = {"terms": {"angular_margin": {"weight": 1.0, "margin": 0.2},
                      "m2mix": {"weight": 0.1, "alpha": 1.5, "tau": 0.1},
                      "calibrated_uniformity": {"weight": 0.2, "t": 3.0, "alpha": 0.4, "min_sim": 0.1, "max_sim": 0.7,
                                                "detach_calibration": False}},
            "local_loss": True}


def _migration_lines(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "mmsphere.losses.config"]


def test_an_old_form_config_loads_as_the_new_form_with_one_line_per_key(caplog):
    with caplog.at_level(logging.INFO, logger="mmsphere.losses.config"):
        old = config_from_dict({"data": GOOD["data"], "loss": OLD_FORM})
    lines = _migration_lines(caplog)
    new = config_from_dict({"data": GOOD["data"], "loss": NEW_FORM})
    assert old == new
    assert old.loss.terms == NEW_FORM["terms"]
    moved = [key for key in OLD_FORM if key not in ("terms", "local_loss")]
    assert len(lines) == len(moved) == 7
    for key, line in zip(moved, lines):
        term, field = LEGACY_KEYS[key]
        assert f"loss.{key}=" in line and f"-> loss.terms.{term}.{field}=" in line


def test_an_old_form_yaml_file_and_override_load_and_save_in_the_new_form(tmp_path, caplog):
    path = tmp_path / "old.yaml"
    path.write_text("data: {train: [{urls: a.tar}]}\nloss:\n  terms: {angular_margin: 1.0, m2mix: 0.1}\n"
                    "  margin: 0.2\n")
    with caplog.at_level(logging.INFO, logger="mmsphere.losses.config"):
        config = load_config(path, ["loss.tau_mix=0.2"])
    assert config.loss.terms == {"angular_margin": {"weight": 1.0, "margin": 0.2}, "m2mix": {"weight": 0.1, "tau": 0.2}}
    assert len(_migration_lines(caplog)) == 2
    save_config(config, tmp_path / "saved.yaml")
    assert not set(load_yaml((tmp_path / "saved.yaml").read_text())["loss"]) & set(LEGACY_KEYS)
    assert load_config(tmp_path / "saved.yaml") == config


def test_without_terms_the_old_keys_go_to_the_default_terms(caplog):
    with caplog.at_level(logging.INFO, logger="mmsphere.losses.config"):
        config = config_from_dict({"data": GOOD["data"], "loss": {"margin": 0.3}})
    assert config.loss.terms == {"angular_margin": {"weight": 1.0, "margin": 0.3}}
    assert len(_migration_lines(caplog)) == 1


def test_an_old_key_for_a_term_not_in_use_is_dropped_with_one_line(caplog):
    with caplog.at_level(logging.INFO, logger="mmsphere.losses.config"):
        config = config_from_dict({"data": GOOD["data"], "loss": {"terms": {"clip": 1.0}, "margin": 0.3,
                                                                   "uniformity_t": 5.0}})
    assert config.loss.terms == {"clip": 1.0}
    lines = _migration_lines(caplog)
    assert len(lines) == 2
    assert "loss.margin=0.3 dropped" in lines[0] and "no angular_margin term" in lines[0] and "no effect" in lines[0]
    assert "loss.uniformity_t=5.0 dropped" in lines[1] and "loss.terms.calibrated_uniformity.t" in lines[1]


def test_an_old_key_and_its_new_field_together_name_both():
    raw = {"data": GOOD["data"], "loss": {"terms": {"angular_margin": {"weight": 1.0, "margin": 0.1}}, "margin": 0.3}}
    with pytest.raises(ConfigError, match=r"loss.margin=0.3 and loss.terms.angular_margin.margin=0.1 are both set"):
        config_from_dict(raw)


def test_the_migration_leaves_the_callers_dict_alone():
    raw = {"data": GOOD["data"], "loss": {"terms": {"angular_margin": 1.0}, "margin": 0.3}}
    config_from_dict(raw)
    assert raw["loss"] == {"terms": {"angular_margin": 1.0}, "margin": 0.3}


@pytest.mark.parametrize("overrides, key, expected", [
    # one entry of a list of sections, read as the declared type of its field
    (["data.train.0.urls=x.tar"], "data.train", [SourceConfig(urls="x.tar", weight=2.0), SourceConfig(urls="b.tar")]),
    (["data.train.1.weight=3"], "data.train", [SourceConfig(urls="a.tar", weight=2.0), SourceConfig(urls="b.tar",
                                                                                                   weight=3.0)]),
    (["data.train.1.modality=image", "data.train.1.name=null"], "data.train",  # a string field takes the text
     [SourceConfig(urls="a.tar", weight=2.0), SourceConfig(urls="b.tar", modality="image", name="null")]),
    # a whole entry, as YAML
    (["data.train.1={urls: c.tar, modality: image}"], "data.train",
     [SourceConfig(urls="a.tar", weight=2.0), SourceConfig(urls="c.tar", modality="image")]),
    # a list the config leaves at its default: the default's entries, one replaced
    (["train.betas.1=0.95"], "train.betas", (0.9, 0.95)),
    (["train.betas.0=1"], "train.betas", (1.0, 0.98)),
    (["loss.imports=[math, json]", "loss.imports.1=os"], "loss.imports", ["math", "os"]),
])
def test_an_override_can_name_one_entry_of_a_list(overrides, key, expected):
    config = load_config(None, ["data.train=[{urls: a.tar, weight: 2}, {urls: b.tar}]", "meta.enabled=false",
                                *overrides])
    value = config
    for part in key.split("."):
        value = getattr(value, part)
    assert value == expected and type(value) is type(expected)
    assert all(type(item) is type(want) for item, want in zip(value, expected))


@pytest.mark.parametrize("override, message", [
    ("data.train.2.urls=x.tar", r"override 'data.train.2.urls=x.tar': index 2 is out of range: data.train has 2 "
                                r"entries \(0 to 1\); to add entries, set the whole list \(data.train=\[...\]\)"),
    ("data.train.7=x.tar", r"index 7 is out of range: data.train has 2 entries"),
    ("train.betas.2=0.5", r"index 2 is out of range: train.betas has 2 entries \(0 to 1\)"),
    ("train.report_to.0=wandb", r"index 0 is out of range: train.report_to is empty"),
    ("data.train.urls=x.tar", r"data.train is a list of 2 entries; name one by its index, as in data.train.0.urls"),
    ("data.train.-1.urls=x.tar", r"data.train is a list of 2 entries; name one by its index"),
    ("data.train.0.weight=heavy", r"data.train.0.weight='heavy' must be a number"),
    ("train.betas.0=fast", r"train.betas.0='fast' must be a number"),
    ("data.train.0.urls.0=x", r"data.train.0.urls is not a section or a list"),
])
def test_an_indexed_override_that_names_no_entry_says_which_list_and_its_length(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["data.train=[{urls: a.tar}, {urls: b.tar}]", override])


def test_the_command_line_reports_an_out_of_range_index_in_one_line(tmp_path, capsys):
    from mmsphere.cli import main as mmsphere_main

    path = tmp_path / "c.yaml"
    save_config(config_from_dict(GOOD), path)
    assert mmsphere_main(["train", "--config", str(path), "data.train.4.urls=x.tar"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error == ["mmsphere train: error: override 'data.train.4.urls=x.tar': index 4 is out of range: data.train "
                     "has 1 entry (0 to 0); to add entries, set the whole list (data.train=[...])"]
