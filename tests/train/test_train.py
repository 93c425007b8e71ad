"""The training loop in one process: outputs, meta weighting, accumulation, pre-flight errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from mmsphere.errors import ConfigError, DataError
from mmsphere.train.config import config_from_dict
from mmsphere.data import Batch
from mmsphere.losses import Objective
from mmsphere.models import create_model, load_run
from mmsphere.train import train
from mmsphere.train.cli import main as train_command
from mmsphere.train.loop import build_accelerator, local_batch_size, parameters_without_gradient
from mmsphere.train.task import Task
from mmsphere.train.optim import build_optimizer, cosine_schedule
from mmsphere.weighting import MetaWeighting

from .conftest import tiny_config


def test_train_with_meta_weighting_writes_a_complete_run(image_text_shards, tmp_path, monkeypatch):
    weightings = []

    class RecordedMetaWeighting(MetaWeighting):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            weightings.append(self)

    monkeypatch.setattr("mmsphere.train.loop.MetaWeighting", RecordedMetaWeighting)
    raw = tiny_config(image_text_shards, tmp_path / "run",
                      meta={"enabled": True, "interval": 2, "hidden": 8, "weights_log_every": 3},
                      loss={"terms": {"angular_margin": 1.0, "m2mix": 0.1, "calibrated_uniformity": 0.1, "cma": 0.001}})
    summary = train(config_from_dict(raw))
    run = tmp_path / "run"
    assert summary["steps"] == 4 and summary["nonfinite_steps_skipped"] == 0
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in metrics] == [1, 2, 3, 4]
    assert all(math.isfinite(record["loss/total"]) for record in metrics)
    assert "meta/meta_loss" in metrics[0] and "meta/meta_loss" not in metrics[1]  # interval 2, steps 0 and 2
    weights = [json.loads(line) for line in (run / "sample_weights.jsonl").read_text().splitlines()]
    # every sample of every 3rd step, and of the last one: bounded however long the run
    assert sorted({row["step"] for row in weights}) == [3, 4]
    assert len(weights) == 2 * 8 and {"step", "key", "loss", "weight"} <= set(weights[0])
    # each logged weight is V(logged loss; Θ), V written out: the meta iterations ran before steps 1 and 3,
    # so steps 3 and 4 both weighed with the final Θ
    (weighting,) = weightings
    w1, b1, w2, b2 = (parameter.detach().double().reshape(-1) for parameter in weighting.weight_net.parameters())
    losses = torch.tensor([row["loss"] for row in weights], dtype=torch.float64)
    expected = torch.sigmoid(torch.relu(losses[:, None] * w1 + b1) @ w2 + b2)
    torch.testing.assert_close(torch.tensor([row["weight"] for row in weights], dtype=torch.float64), expected,
                               rtol=1e-6, atol=0)
    assert expected.std() > 1e-4  # the weights do depend on the losses
    assert (run / "weighting_curve.png").stat().st_size > 0
    assert [path.name for path in sorted((run / "checkpoints").iterdir())] == ["step_00000002", "step_00000004"]
    model = load_run(run)
    exported = dict(model.named_parameters())["clip.logit_scale"]
    assert 0 <= exported.item() <= math.log(100)


def test_logit_scale_is_clamped(image_text_shards, tmp_path):
    raw = tiny_config(image_text_shards, tmp_path / "run", train={"lr": 10.0, "max_steps": 2, "grad_clip": None})
    train(config_from_dict(raw))
    assert load_run(tmp_path / "run").log_logit_scale.item() <= math.log(100) + 1e-6


def test_existing_run_needs_resume(image_text_shards, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("seed: 1\n")
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ConfigError, match="already holds a run.*train.resume=latest"):
        train(config_from_dict(tiny_config(image_text_shards, tmp_path / "run")))


def test_the_first_hour_in_one_process(image_text_shards, tmp_path, capsys):
    """A start that fails on its data leaves a directory the corrected retry may use; a run prints only what matters.

    The terminal: where the run and its log are, that the model starts from random initialisation on
    purpose, a line per checkpoint, the progress bar, and the summary once on stdout. open_clip's
    messages and the rest go to the run's train.log.
    """
    run = tmp_path / "run"
    raw = tiny_config(image_text_shards, run, train={"max_steps": 2, "checkpoint_every": 1})
    raw["data"]["train"][0]["modality"] = "video"  # image shards declared as video
    (tmp_path / "wrong.yaml").write_text(yaml.safe_dump(raw))
    assert train_command(["--config", str(tmp_path / "wrong.yaml")]) == 2
    error = capsys.readouterr().err.replace("\r", "\n").splitlines()
    assert error[-1].startswith("mmsphere train: error: data source 'train0' has modality=video, but its first 16 ")
    assert (run / "config.yaml").is_file()  # written before the failure

    raw["data"]["train"][0]["modality"] = "image"
    (tmp_path / "right.yaml").write_text(yaml.safe_dump(raw))
    assert train_command(["--config", str(tmp_path / "right.yaml")]) == 0
    printed = capsys.readouterr()
    assert json.loads(printed.out)["steps"] == 2  # the summary, once
    messages = [line for line in printed.err.replace("\r", "\n").splitlines()
                if line.strip() and not line.startswith("train:")]
    assert messages == [f"run directory {run} (log: {run / 'train.log'})",
                        "training mmsphere-tiny from random initialisation (model.pretrained is not set)",
                        f"saved checkpoint {run / 'checkpoints' / 'step_00000001'}",
                        f"saved checkpoint {run / 'checkpoints' / 'step_00000002'}"]
    log = (run / "train.log").read_text()
    assert "Parsing model identifier" in log and "run summary" in log and "data source 'train0'" in log
    assert "No pretrained weights loaded" not in log + printed.err  # open_clip's, replaced by the line above


def test_ddp_looks_for_unused_parameters_only_where_a_step_leaves_some(image_text_shards, tmp_path):
    """Images bypass the temporal head; a logit bias no loss term reads gets no gradient; otherwise none."""
    def unused(model=None, train_sources=("image",), **sections):
        raw = tiny_config(image_text_shards, tmp_path, **sections)
        raw["model"].update(model or {})
        raw["data"]["train"] = [{"urls": image_text_shards["train"], "modality": modality} for modality in train_sources]
        config = config_from_dict(raw)
        return parameters_without_gradient(create_model(config.model), Objective(config.loss), config)

    assert unused() == {}
    assert unused({"temporal_head": "transformer"}, ("video",)) == {}
    mixed = unused({"temporal_head": "transformer"}, ("video", "image"))
    assert mixed and all(name.startswith("temporal.") and why == "the forward of a image batch"
                         for name, why in mixed.items())
    assert set(mixed) == {name for name, _ in create_model(config_from_dict(tiny_config(
        image_text_shards, tmp_path, model={"temporal_head": "transformer"})).model).temporal.named_parameters(
        prefix="temporal")}
    assert unused({"init_logit_bias": -10.0}) == {"clip.logit_bias": "the loss (no loss term reads the logit bias)"}
    assert unused({"freeze_image": True, "freeze_text": True, "temporal_head": "transformer"}, ("image",)) == {
        name: "the forward of a image batch" for name in mixed}


def test_missing_shards_fail_before_work(image_text_shards, tmp_path):
    raw = tiny_config(image_text_shards, tmp_path / "run")
    raw["data"]["train"][0]["urls"] = str(tmp_path / "nowhere-{000..003}.tar")
    with pytest.raises(DataError, match=r"data.train\[0\].urls=.*4 of 4 shards do not exist"):
        train(config_from_dict(raw))
    assert not (tmp_path / "run").exists()


def test_empty_meta_set_fails_before_work(image_text_shards, tmp_path):
    empty = tmp_path / "empty-000000.tar"
    import tarfile

    tarfile.open(empty, "w").close()
    raw = tiny_config(image_text_shards, tmp_path / "run", meta={"enabled": True})
    raw["data"]["meta"]["urls"] = str(empty)
    with pytest.raises(DataError, match="data.meta.urls=.*holds no samples"):
        train(config_from_dict(raw))


def test_batch_smaller_than_processes():
    with pytest.raises(ConfigError, match="train.batch_size=2 must be a multiple of the number of processes \\(4\\)"):
        local_batch_size(2, 4)
    assert local_batch_size(8, 2) == 4


@pytest.mark.parametrize("global_batch, processes, accum_freq, problem", [
    (12, 2, 4, "cannot split into equal micro-batches; use a multiple of 8"),  # 6 rows, 4 micro-batches
    (2, 2, 1, "leaves 1 sample\\(s\\) per micro-batch; each needs at least 2: use at least 4"),
    (8, 2, 4, "leaves 1 sample\\(s\\) per micro-batch"),
])
def test_batch_split_is_checked_per_process_and_micro_batch(global_batch, processes, accum_freq, problem):
    with pytest.raises(ConfigError, match=f"train.batch_size={global_batch} .*{problem}"):
        local_batch_size(global_batch, processes, accum_freq)


def test_an_unsplittable_batch_stops_the_run_before_any_work(image_text_shards, tmp_path):
    raw = tiny_config(image_text_shards, tmp_path / "run", train={"batch_size": 6, "accum_freq": 4})
    with pytest.raises(ConfigError, match="train.accum_freq=4"):
        train(config_from_dict(raw))
    assert not (tmp_path / "run").exists()


def test_skip_counts_belong_to_their_run(image_text_shards, tmp_path):
    """Skips another run (or an evaluation) left in this process do not show up in a run's summary."""
    from mmsphere.data.stats import add_skipped

    add_skipped({"empty_caption": 5})
    summary = train(config_from_dict(tiny_config(image_text_shards, tmp_path / "run")))
    assert summary["skipped_samples"] == {}


def test_weight_decay_groups_and_tower_learning_rates(image_text_shards, tmp_path):
    config = config_from_dict(tiny_config(image_text_shards, tmp_path, model={"name": "mmsphere-tiny", "text_lr": 1e-5}))
    model = create_model(config.model)
    optimizer = build_optimizer(model, config)
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    group_of = {names[id(parameter)]: group for group in optimizer.param_groups for parameter in group["params"]}
    assert set(group_of) == set(names.values())
    # written out for mmsphere-tiny, not derived by the rule under test: matrices decay; gains, biases,
    # embeddings and the temperature do not
    decayed = {"clip.text_projection", "clip.visual.proj", "clip.visual.conv1.weight",
               "clip.visual.transformer.resblocks.0.attn.in_proj_weight",
               "clip.visual.transformer.resblocks.0.mlp.c_fc.weight",
               "clip.transformer.resblocks.0.attn.out_proj.weight", "clip.transformer.resblocks.0.mlp.c_proj.weight"}
    not_decayed = {"clip.logit_scale", "clip.positional_embedding", "clip.visual.positional_embedding",
                   "clip.visual.class_embedding", "clip.token_embedding.weight", "clip.ln_final.weight",
                   "clip.visual.ln_pre.bias", "clip.transformer.resblocks.0.attn.in_proj_bias"}
    for name in decayed:
        assert group_of[name]["weight_decay"] == config.train.weight_decay, name
    for name in not_decayed:
        assert group_of[name]["weight_decay"] == 0.0, name
    text = {"clip.text_projection", "clip.token_embedding.weight", "clip.positional_embedding", "clip.ln_final.weight",
            "clip.transformer.resblocks.0.mlp.c_proj.weight"}
    image = {"clip.visual.proj", "clip.visual.conv1.weight", "clip.visual.class_embedding"}
    assert {group_of[name]["lr"] for name in text} == {1e-5}
    assert {group_of[name]["lr"] for name in image} == {config.train.lr}


def test_cosine_schedule_warms_up_then_decays():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = cosine_schedule(optimizer, warmup_steps=4, max_steps=12)
    rates = []
    for _ in range(12):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert rates[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert rates[4] == pytest.approx(1.0) and rates[8] == pytest.approx(0.5)
    assert all(later <= earlier for earlier, later in zip(rates[3:], rates[4:]))


@pytest.mark.parametrize("terms", [{"clip": 1.0}, {"angular_margin": 1.0, "m2mix": 0.5, "calibrated_uniformity": 0.5, "cma": 0.1}])
def test_accumulation_keeps_all_negatives(image_text_shards, tmp_path, terms):
    """accum_freq=2 gives the gradients of one full batch, not of two half batches."""
    gradients = {}
    for accum in (1, 2):
        config = config_from_dict(tiny_config(image_text_shards, tmp_path, loss={"terms": terms},
                                              train={"accum_freq": accum, "batch_size": 8}))
        torch.manual_seed(0)
        model = create_model(config.model).double()
        accelerator = build_accelerator(config)
        generator = torch.Generator().manual_seed(1)
        text = torch.randint(1, 400, (8, 16), generator=generator)
        batch = Batch("image", torch.randn(8, 3, 32, 32, generator=generator, dtype=torch.float64), text=text)
        result = Task.from_config(config, model, accelerator).forward_backward(batch, step=3)
        gradients[accum] = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        losses = result.loss.item()
        gradients[f"loss{accum}"] = losses
    assert gradients["loss1"] == pytest.approx(gradients["loss2"], rel=1e-10)
    assert gradients[1].keys() == gradients[2].keys()
    for name in gradients[1]:
        torch.testing.assert_close(gradients[2][name], gradients[1][name], rtol=1e-7, atol=1e-10, msg=name)


def test_non_finite_losses_skip_steps_then_stop(image_text_shards, tmp_path, monkeypatch):
    """A NaN loss skips its step; max_nonfinite_steps in a row stop the run, checkpoints intact."""
    from mmsphere.losses import objective as objective_module
    from mmsphere.train.loop import NonFiniteLossError

    original = objective_module.Objective.reduce
    calls = {"count": 0}

    def poisoned_after_two_steps(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        calls["count"] += 1
        if calls["count"] > 2:  # steps 1-2 are fine (checkpoint at step 2), then every loss is NaN
            result.loss = result.loss * float("nan")
            result.terms["total"] = result.loss.detach()
        return result

    monkeypatch.setattr(objective_module.Objective, "reduce", poisoned_after_two_steps)
    raw = tiny_config(image_text_shards, tmp_path / "run", train={"max_steps": 10, "max_nonfinite_steps": 3})
    with pytest.raises(NonFiniteLossError, match="3 non-finite losses in a row at step 2.*step_00000002"):
        train(config_from_dict(raw))
    assert [path.name for path in (tmp_path / "run" / "checkpoints").iterdir()] == ["step_00000002"]
    assert not (tmp_path / "run" / "summary.json").exists()
