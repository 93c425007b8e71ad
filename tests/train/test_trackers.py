"""``train.report_to``: accelerate's experiment trackers receive the config and every metrics record."""

from __future__ import annotations

import json

import pytest
from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

from mmsphere.errors import ConfigError
from mmsphere.train.config import config_from_dict, load_config
from mmsphere.train import train
from mmsphere.train.run_log import PROJECT_NAME, check_trackers, tracker_config

from .conftest import tiny_config


def test_tensorboard_receives_every_metrics_record_and_the_config(image_text_shards, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    raw = tiny_config(image_text_shards, tmp_path / "run", train={"report_to": ["tensorboard"], "val_every": 2},
                      data={"val": {"urls": image_text_shards["meta"], "modality": "image"}})
    train(config_from_dict(raw))
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records] == [1, 2, 2, 3, 4, 4, 4]  # train steps, val at 2, 4 and the end

    events = EventAccumulator(str(run / PROJECT_NAME), size_guidance={"scalars": 0})
    events.Reload()
    names = {name for record in records for name in record if name != "step"}
    assert {"loss/total", "lr", "logit_scale", "val/t2v/R@1"} <= names
    assert set(events.Tags()["scalars"]) == names
    for name in sorted(names):
        expected = [(record["step"], record[name]) for record in records if name in record]
        logged = [(event.step, event.value) for event in events.Scalars(name)]
        assert [step for step, _ in logged] == [step for step, _ in expected], name
        # TensorBoard stores float32
        assert [value for _, value in logged] == pytest.approx([value for _, value in expected], rel=1e-6), name

    # the resolved config, flattened, is the run's hyper-parameter table
    # (torch's add_hparams writes them to a sub-folder, beside accelerate's own hparams.yml folder)
    (hparams_events,) = (run / PROJECT_NAME).glob("*/events.out.tfevents.*")
    session = EventAccumulator(str(hparams_events.parent))
    session.Reload()
    content = session.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    assert start.hparams["train.lr"].number_value == pytest.approx(1e-3)
    assert start.hparams["data.train.0.urls"].string_value == image_text_shards["train"]
    assert start.hparams["train.report_to.0"].string_value == "tensorboard"
    assert start.hparams["meta.enabled"].bool_value is False


def test_no_tracker_unless_asked(image_text_shards, tmp_path):
    pytest.importorskip("tensorboard")  # installed, but not named in train.report_to
    train(config_from_dict(tiny_config(image_text_shards, tmp_path / "run", train={"max_steps": 1})))
    assert sorted(path.name for path in (tmp_path / "run").iterdir() if path.is_dir()) == ["checkpoints"]


def test_a_tracker_that_is_not_installed_stops_the_run_before_its_directory_exists(image_text_shards, tmp_path):
    installed = {str(tracker) for tracker in get_available_trackers()}
    absent = next((name for name in ("aim", "clearml", "swanlab", "dvclive", "comet_ml", "wandb")
                   if name not in installed), None)
    if absent is None:
        pytest.skip("every candidate tracker is installed here")
    raw = tiny_config(image_text_shards, tmp_path / "run", train={"report_to": [absent]})
    message = rf"train.report_to\[0\]='{absent}': .*not installed; pip install \S*{absent}"
    with pytest.raises(ConfigError, match=message):
        train(config_from_dict(raw))
    assert not (tmp_path / "run").exists()


def test_an_unknown_tracker_gets_the_closest_name(image_text_shards, tmp_path):
    raw = tiny_config(image_text_shards, tmp_path / "run", train={"report_to": ["tensorboard", "mlfow"]})
    with pytest.raises(ConfigError, match=r"train.report_to\[1\]='mlfow' is not a tracker .*did you mean 'mlflow'\?"):
        train(config_from_dict(raw))
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="did you mean 'tensorboard'"):
        check_trackers(["TensorBoard"])
    with pytest.raises(ConfigError, match="choose from " + ", ".join(sorted(LOGGER_TYPE_TO_CLASS))):
        check_trackers(["zzz"])
    check_trackers([])
    check_trackers(["all"])  # accelerate's every-installed-tracker


def test_report_to_overrides_read_as_a_list():
    assert load_config(None, ["train.report_to=tensorboard"]).train.report_to == ["tensorboard"]
    assert load_config(None, ["train.report_to=[tensorboard, wandb]"]).train.report_to == ["tensorboard", "wandb"]
    assert load_config(None, []).train.report_to == []


def test_the_tracker_config_is_flat_scalars(image_text_shards, tmp_path):
    config = config_from_dict(tiny_config(image_text_shards, tmp_path / "run"))
    flat = tracker_config(config)
    assert all(isinstance(value, (bool, int, float, str)) for value in flat.values())
    assert flat["train.batch_size"] == 8 and flat["train.betas.1"] == 0.98
    assert flat["loss.terms.angular_margin.weight"] == 1.0 and flat["loss.terms.angular_margin.margin"] == 0.1
    assert flat["data.val"] == "null" and flat["train.report_to"] == "[]"
    assert flat["data.train.0.modality"] == "image" and flat["data.meta.urls"] == image_text_shards["meta"]
