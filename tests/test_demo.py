"""The demo's report: markdown and metrics.json built from a real tiny run; the weight AUROC against scikit-learn."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from mmsphere.train.config import config_from_dict
from mmsphere.demo import weight_separation, write_report
from mmsphere.eval.evaluate import evaluate_retrieval
from mmsphere.models import create_model, load_run
from mmsphere.ood.evaluate import evaluate_ood
from mmsphere.train import train

from .train.conftest import COLOURS, tiny_config, write_image_text_shards


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    """A 4-step meta-weighted run of the tiny model, evaluated before and after the way the demo does."""
    root = tmp_path_factory.mktemp("demo-report")
    shards = {"train": write_image_text_shards(root / "shards", "train", shards=2, per_shard=24, seed=0),
              "meta": write_image_text_shards(root / "shards", "meta", shards=2, per_shard=16, seed=1)}
    config = config_from_dict(tiny_config(shards, root / "run", meta={"enabled": True, "interval": 2, "hidden": 8,
                                                                          "weights_log_every": 1}))
    id_images, ood_images = str(root / "shards" / "meta-000000.tar"), str(root / "shards" / "meta-000001.tar")

    def evaluate(model):
        model.eval()
        retrieval = evaluate_retrieval(model, shards["meta"], modality="image", batch_size=16, progress=False)
        ood = evaluate_ood(model, id_images, {"ood": ood_images}, list(COLOURS), ["a {} square"], score="mcm",
                           temperature=1.0, positive="id").metrics["ood"]
        return {"retrieval": retrieval["metrics"], "geometry": retrieval["geometry"], "ood_mcm": ood}

    before = evaluate(create_model(config.model))
    summary = train(config)
    after = evaluate(load_run(root / "run"))
    logged = [json.loads(line) for line in (root / "run" / "sample_weights.jsonl").read_text().splitlines()]
    # "mismatched" pairs picked among those weighed in the second half of training, which is what counts
    late_keys = sorted({row["key"] for row in logged if row["step"] > summary["steps"] / 2})
    mismatched = set(late_keys[::3])
    weights = weight_separation(root / "run" / "sample_weights.jsonl", mismatched)
    assert weights is not None
    report = {
        "config": str(root / "run" / "config.yaml"),
        "data": {"dir": str(root / "shards"), "mismatch_fraction": 0.25, "mismatched_pairs": len(mismatched),
                 "splits": {"train": 48, "meta": 32}},
        "before": before, "after": after,
        "weights": {key: value for key, value in weights.items() if key != "per_key"},
        "training": summary,
        "timing_s": {"data": 1.0, "train": 12.0, "total": 20.0},
        "plots": {},
    }
    return root, report, config


def test_the_report_holds_the_runs_numbers(tiny_report):
    root, report, config = tiny_report
    metrics_path, markdown_path = write_report(root, report, config)
    assert json.loads(metrics_path.read_text()) == json.loads(json.dumps(report))
    markdown = markdown_path.read_text()
    for label in ("before", "after"):
        for direction, values in report[label]["retrieval"].items():
            assert (f"| {label} | {direction} | {values['R@1']:.1f} | {values['R@5']:.1f} | {values['R@10']:.1f} | "
                    f"{values['MdR']:.1f} | {values['MnR']:.1f} |") in markdown
        ood = report[label]["ood_mcm"]
        assert f"| {label} | {ood['AUROC']:.3f} | {ood['AUPR_IN']:.3f} | {ood['AUPR_OUT']:.3f} | {ood['FPR95']:.3f} |" \
            in markdown
        assert f"| {label} | " + " | ".join(f"{value:.3f}" for value in report[label]["geometry"].values()) in markdown
    weights = report["weights"]
    assert f"**{weights['auroc_clean_vs_mismatched']:.3f}**" in markdown
    assert (f"over {weights['clean_pairs']} clean and {weights['mismatched_pairs']} mismatched pairs; mean weight "
            f"{weights['mean_weight_clean']:.3f} (clean) vs {weights['mean_weight_mismatched']:.3f}") in markdown
    assert f"{report['training']['steps']} steps of global batch {config.train.batch_size}" in markdown
    assert (f"25% of training captions deliberately mismatched ({report['data']['mismatched_pairs']} pairs)"
            in markdown)


def test_the_report_without_meta_weights_says_so(tiny_report, tmp_path):
    _, report, config = tiny_report
    _, markdown_path = write_report(tmp_path, {**report, "weights": None}, config)
    assert "no weights to compare" in markdown_path.read_text()
    assert json.loads((tmp_path / "metrics.json").read_text())["weights"] is None


def test_weight_separation_matches_scikit_learn(tmp_path):
    rng = np.random.default_rng(0)
    keys = [f"pair{index:02d}" for index in range(12)]
    mismatched = set(keys[:4])
    rows = []
    for step in range(1, 9):
        for key in keys:
            base = 0.3 if key in mismatched else 0.6
            rows.append({"step": step, "key": key, "loss": 1.0, "weight": float(base + rng.normal(0, 0.15))})
    rows.append({"step": 9, "key": "pair00", "loss": 1.0, "weight": 0.6})  # one tie-prone late row
    rows.append({"step": 1, "key": "early_only", "loss": 1.0, "weight": 0.9})  # first half only: left out
    path = tmp_path / "sample_weights.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))

    separation = weight_separation(path, mismatched)

    last_step = 9
    late = [row for row in rows if row["step"] > last_step / 2]
    mean_weight = {key: np.mean([row["weight"] for row in late if row["key"] == key]) for key in keys}
    labels = [0 if key in mismatched else 1 for key in keys]  # clean = positive
    assert separation["auroc_clean_vs_mismatched"] == pytest.approx(
        roc_auc_score(labels, [mean_weight[key] for key in keys]))
    assert (separation["clean_pairs"], separation["mismatched_pairs"]) == (8, 4)
    assert separation["mean_weight_clean"] == pytest.approx(np.mean([mean_weight[key] for key in keys[4:]]))
    assert separation["mean_weight_mismatched"] == pytest.approx(np.mean([mean_weight[key] for key in keys[:4]]))


def test_weight_separation_needs_both_kinds_of_pairs(tmp_path):
    path = tmp_path / "sample_weights.jsonl"
    path.write_text(json.dumps({"step": 1, "key": "a", "loss": 1.0, "weight": 0.5}) + "\n")
    assert weight_separation(path, {"a"}) is None  # no clean pair
    assert weight_separation(path, set()) is None  # no mismatched keys
    assert weight_separation(tmp_path / "missing.jsonl", {"a"}) is None
