"""``mmsphere score-ood`` end to end: a saved tiny run on image folders and image shards."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.image import imread
from PIL import Image
from sklearn import metrics as sk

from mmsphere.data.transforms import to_model_frames
from mmsphere.models import load_run
from mmsphere.ood.cli import main
from tests.run_dirs import incompatible_run, nan_run


def independent_scores(run_dir: Path, image_paths: list[str], classes: list[str], templates: list[str],
                       score: str, temperature: float, negatives: list[str] | None = None) -> list[float]:
    """Each score's formula in float64 loops over features from the model's own encoders."""
    model = load_run(run_dir)
    with torch.no_grad():
        pixels = [to_model_frames(np.asarray(Image.open(path).convert("RGB"))[None], num_frames=1,
                                  image_size=model.image_size, mean=model.image_mean, std=model.image_std)[0][0]
                  for path in image_paths]
        images = model.encode_image(torch.stack(pixels)).double().tolist()

        def prompts(names: list[str]) -> list[list[float]]:
            rows = []
            for name in names:
                per_template = model.encode_text(model.tokenizer([t.format(name) for t in templates])).double()
                mean = per_template.mean(dim=0)
                rows.append((mean / mean.norm()).tolist())
            return rows

        class_rows, negative_rows = prompts(classes), prompts(negatives or [])
    expected = []
    for image in images:
        logits = [sum(a * b for a, b in zip(image, row)) / temperature for row in class_rows]
        exponentials = [math.exp(value) for value in logits]
        if score in ("mcm", "msp"):
            expected.append(max(exponentials) / sum(exponentials))
        elif score == "maxlogit":
            expected.append(max(logits))
        elif score == "energy":
            expected.append(math.log(sum(exponentials)))
        else:
            negative = [math.exp(sum(a * b for a, b in zip(image, row)) / temperature) for row in negative_rows]
            expected.append(sum(exponentials) / (sum(exponentials) + sum(negative)))
    return expected


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# one softmax score on cosines, one on the model's own logits, and the one with negative labels;
# msp and maxlogit differ from these only in the dispatch that tests/ood/test_scores.py covers
@pytest.mark.parametrize("score", ["mcm", "energy", "neglabel"])
def test_end_to_end_scores_metrics_and_plots(score, run_dir, image_sets, tmp_path, capsys):
    templates = ["a photo of a {}.", "a {} thing"]
    (tmp_path / "templates.txt").write_text("\n".join(templates) + "\n")
    extra = []
    if score == "neglabel":
        (tmp_path / "negatives.txt").write_text("black\nwhite\npurple\n")
        extra = ["--neg-labels", str(tmp_path / "negatives.txt")]
    out = tmp_path / "ood.json"
    code = main(["--run", str(run_dir), "--id", image_sets["id"], "--ood", f"flat={image_sets['flat']}",
                 "--ood", f"shards={image_sets['shards']}", "--classes", image_sets["classes"], "--templates",
                 str(tmp_path / "templates.txt"), "--score", score, "--out", str(out), *extra])
    printed = capsys.readouterr().out
    assert code == 0
    results = json.loads(out.read_text())
    model = load_run(run_dir)
    default_temperature = {"mcm": 1.0, "neglabel": 0.01}.get(score, 1 / float(model.log_logit_scale.detach().exp()))
    assert results["temperature"] == pytest.approx(default_temperature)

    rows = read_rows(tmp_path / "ood.scores.csv")
    assert [row["set"] for row in rows] == ["id"] * 8 + ["flat"] * 5 + ["shards"] * 3
    shard_files = {f"ood{index}": str(Path(image_sets["root"]) / "for_shards" / f"{index}.png") for index in range(3)}
    files = [shard_files.get(row["name"], row["name"]) for row in rows]
    expected = independent_scores(run_dir, files, ["red", "green"], templates, score, default_temperature,
                                  ["black", "white", "purple"] if score == "neglabel" else None)
    np.testing.assert_allclose([float(row["score"]) for row in rows], expected, rtol=1e-4, atol=1e-6)

    scores = np.array([float(row["score"]) for row in rows])
    is_id = np.array([row["set"] == "id" for row in rows])
    for name in ("flat", "shards"):
        in_set = np.array([row["set"] == name for row in rows])
        labels, values = is_id[is_id | in_set], scores[is_id | in_set]
        fpr, tpr, _ = sk.roc_curve(labels, values, drop_intermediate=False)
        assert results["metrics"][name] == pytest.approx({
            "AUROC": sk.roc_auc_score(labels, values),
            "AUPR_IN": sk.average_precision_score(labels, values),
            "AUPR_OUT": sk.average_precision_score(~labels, -values),
            "FPR95": fpr[np.argmax(tpr >= 0.95)],
        })
    for key in ("AUROC", "AUPR_IN", "AUPR_OUT", "FPR95"):
        assert results["metrics"]["mean"][key] == pytest.approx(
            (results["metrics"]["flat"][key] + results["metrics"]["shards"][key]) / 2)

    predicted_right = [row["predicted_class"] == row["class"] for row in rows if row["set"] == "id"]
    assert results["id"]["accuracy"] == pytest.approx(np.mean(predicted_right))
    assert results["ood"]["flat"]["num_samples"] == 5 and results["id"]["num_samples"] == 8
    assert results["convention"].startswith("higher score = more in-distribution; ID is the positive class")
    for png in ("ood.roc.png", "ood.hist.png"):
        assert imread(tmp_path / png).ndim == 3
    assert "convention: higher score = more in-distribution" in printed and "mean" in printed


def test_positive_ood_uses_the_openood_fpr95(run_dir, image_sets, tmp_path):
    out = tmp_path / "ood.json"
    assert main(["--run", str(run_dir), "--id", image_sets["id"], "--ood", f"flat={image_sets['flat']}",
                 "--classes", image_sets["classes"], "--positive", "ood", "--temperature", "0.5",
                 "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    rows = read_rows(tmp_path / "ood.scores.csv")
    scores = np.array([float(row["score"]) for row in rows])
    is_ood = np.array([row["set"] == "flat" for row in rows])
    fpr, tpr, _ = sk.roc_curve(is_ood, -scores, drop_intermediate=False)
    assert results["metrics"]["flat"]["FPR95"] == pytest.approx(fpr[np.argmax(tpr >= 0.95)])
    assert results["temperature"] == 0.5 and results["positive"] == "ood"
    assert "OpenOOD" in results["convention"]


def _file(tmp_path: Path, name: str, text: str) -> str:
    (tmp_path / name).write_text(text)
    return str(tmp_path / name)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda args, tmp, run: {"--id": str((tmp / "empty").mkdir() or tmp / "empty")}, "holds no images"),
        (lambda args, tmp, run: {"--classes": _file(tmp, "c.txt", "red\ngreen\nred\n")},
         "lists 'red' twice (lines 1 and 3)"),
        (lambda args, tmp, run: {"--classes": _file(tmp, "c.txt", "red\n\ngreen\n")}, "blank line at line 2"),
        (lambda args, tmp, run: {"--classes": _file(tmp, "c.txt", "")}, "is empty"),
        (lambda args, tmp, run: {"--classes": str(tmp / "missing.txt")}, "does not exist"),
        (lambda args, tmp, run: {"--templates": _file(tmp, "t.txt", "a photo\n")}, "exactly one '{}'"),
        (lambda args, tmp, run: {"--ood": "nameless"}, "--ood expects NAME=DIR_OR_SHARDS"),
        (lambda args, tmp, run: {"--ood": f"x={tmp / 'nowhere'}"}, "does not exist"),
        (lambda args, tmp, run: {"--score": "neglabel"}, "--score neglabel needs --neg-labels"),
        (lambda args, tmp, run: {"--score": "neglabel", "--neg-labels": _file(tmp, "n.txt", "blue\nred\n")},
         "negative labels ['red'] are also ID classes"),
        (lambda args, tmp, run: {"--temperature": "-1"}, "--temperature=-1.0 must be > 0"),
        (lambda args, tmp, run: {"--run": str(incompatible_run(run, tmp))}, "format_version=99"),
        (lambda args, tmp, run: {"--run": str(nan_run(run, tmp))}, "non-finite features"),
    ],
)
def test_bad_input_fails_with_one_clear_message(change, message, run_dir, image_sets, tmp_path, capsys):
    arguments = {"--run": str(run_dir), "--id": image_sets["id"], "--ood": f"flat={image_sets['flat']}",
                 "--classes": image_sets["classes"], "--out": str(tmp_path / "ood.json")}
    arguments.update(change(arguments, tmp_path, run_dir))
    assert main([item for pair in arguments.items() for item in pair]) == 2
    # the message is the last line; progress bars may precede it on stderr
    error = capsys.readouterr().err.rstrip("\n").split("\n")[-1].split("\r")[-1]
    assert error.startswith("mmsphere score-ood: error:") and message in error
    assert not (tmp_path / "ood.json").exists()
