"""The meta iteration that reuses the real step's train forward gives the updates of the one that runs its own.

``meta.reuse_forward: true`` (the default with ``jvp``, no accumulation, no autocast) takes the
virtual gradient from the real step's forward and runs the real backward on the same graph with the
updated weights; ``false`` is the reference path (its own virtual forward, then the real forward).
Same data, same seed, float32: the loss curve, the meta losses, the sample weights and the final
parameters must agree.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from mmsphere.models import DualEncoder, load_run
from mmsphere.train import train
from mmsphere.train.config import config_from_dict

from .conftest import tiny_config


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _weights(run: Path) -> list[float]:
    return [json.loads(line)["weight"] for line in (run / "sample_weights.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("terms, positives", [
    ({"angular_margin": {"weight": 1.0, "margin": 0.1}, "m2mix": 0.1, "calibrated_uniformity": 0.1}, "diagonal"),
    ({"sface": {"weight": 1.0, "scale": 10.0}}, "group"),
])
def test_reusing_the_train_forward_gives_the_reference_updates(image_text_shards, tmp_path, terms, positives):
    from .conftest import write_image_text_shards

    shards = image_text_shards
    if positives == "group":
        shards = {"train": write_image_text_shards(tmp_path / "grouped", "train", 2, 24, seed=5, groups=True),
                  "meta": write_image_text_shards(tmp_path / "grouped", "meta", 1, 16, seed=6, groups=True)}
    raw = tiny_config(shards, tmp_path / "reused",
                      loss={"terms": terms, "positives": positives},
                      meta={"enabled": True, "interval": 1, "hidden": 8, "lr": 0.05, "weights_log_every": 1},
                      train={"max_steps": 5, "checkpoint_every": 5, "log_every": 1})
    reference = copy.deepcopy(raw)
    reference["output_dir"] = str(tmp_path / "reference")
    reference["meta"]["reuse_forward"] = False
    forwards = []
    original = DualEncoder._visual_unnormalized

    def counted(self, *args, **kwargs):
        forwards[-1] += 1
        return original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(DualEncoder, "_visual_unnormalized", counted)
        for config in (raw, reference):
            forwards.append(0)
            train(config_from_dict(config))
    # per step: train forward, meta forward at ŵ, forward-mode pass at w (+ the reference's own virtual forward)
    assert forwards == [3 * 5, 4 * 5]
    reused, expected = _records(tmp_path / "reused"), _records(tmp_path / "reference")
    assert [record["step"] for record in reused] == [1, 2, 3, 4, 5]
    for got, want in zip(reused, expected):
        # the same curves to 1e-6: by step 5 the key biases' rounding noise (below) reaches the losses at a
        # few 1e-7, more or less with the thread count (6e-7 on one thread, where rel 1e-6 alone was too tight)
        for key in ("loss/total", "meta/virtual_loss", "meta/meta_loss", "meta/weight_mean"):
            assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-6), (got["step"], key)
    assert _weights(tmp_path / "reused") == pytest.approx(_weights(tmp_path / "reference"), rel=1e-6, abs=1e-7)
    trained, wanted = (dict(load_run(tmp_path / name).named_parameters()) for name in ("reused", "reference"))
    for name, parameter in wanted.items():
        # atol 5e-6: the attention key biases get a gradient that is zero in exact arithmetic (softmax is
        # invariant to them), so theirs is rounding noise, which Adam scales to lr-sized steps
        torch.testing.assert_close(trained[name], parameter, rtol=1e-5, atol=5e-6, msg=name)
    # the comparison means something: the WeightNet moved and the weights are not all equal
    assert len(set(round(weight, 6) for weight in _weights(tmp_path / "reused"))) > 1
