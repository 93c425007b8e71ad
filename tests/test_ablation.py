"""The ablation tool: a real two-variant, two-seed study of the tiny model, its files, its statistics, bad input."""

from __future__ import annotations

import io
import json
import math
import re
import shutil
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
import yaml
from PIL import Image
from sklearn.metrics import roc_auc_score

from mmsphere.ablation import OodSets, ablation_markdown, aggregate, mean_and_std, run_ablation, variant_config
from mmsphere.ablation.variants import split_variants
from mmsphere.ablation.cli import main
from mmsphere.errors import ConfigError, MmsphereError
from mmsphere.train.config import config_from_dict
from mmsphere.eval.evaluate import evaluate_retrieval_loader
from mmsphere.models import load_run

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
ID_CLASSES, OOD_CLASSES = ("red", "green"), ("blue", "yellow")
VARIANTS, SEEDS, STEPS = ["clip", "meta"], [0, 1], 2


def colour_image(colour: str, rng: np.random.Generator) -> Image.Image:
    """A 32 px picture: noise with a coloured square somewhere in the middle."""
    pixels = rng.integers(0, 40, (32, 32, 3)).astype(np.uint8)
    top, left = rng.integers(4, 12, size=2)
    pixels[top:top + 16, left:left + 16] = COLOURS[colour]
    return Image.fromarray(pixels)


def write_shards(directory: Path, prefix: str, count: int, seed: int, mismatched: int = 0) -> tuple[str, list[str]]:
    """``count`` image-caption pairs in two shards, the first ``mismatched`` captioned with a wrong colour."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    names, keys = list(COLOURS), []
    for shard in range(2):
        with wds.TarWriter(str(directory / f"{prefix}-{shard:06d}.tar")) as writer:
            for index in range(shard * count // 2, (shard + 1) * count // 2):
                colour = names[rng.integers(len(names))]
                caption = names[(names.index(colour) + 1) % len(names)] if index < mismatched else colour
                buffer = io.BytesIO()
                colour_image(colour, rng).save(buffer, format="JPEG")
                key = f"{prefix}{index:04d}"
                writer.write({"__key__": key, "jpg": buffer.getvalue(), "txt": f"a {caption} square"})
                keys.append(key)
    return str(directory / f"{prefix}-{{000000..000001}}.tar"), keys


def write_image_folder(directory: Path, classes: tuple[str, ...], per_class: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    for colour in classes:
        (directory / colour).mkdir(parents=True)
        for index in range(per_class):
            colour_image(colour, rng).save(directory / colour / f"{index}.png")
    return str(directory)


@pytest.fixture(scope="module")
def study_data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("ablation-data")
    train, train_keys = write_shards(root / "train", "train", 32, seed=0, mismatched=8)
    classes = root / "classes.txt"
    classes.write_text("\n".join(ID_CLASSES) + "\n")
    return {
        "train": train, "mismatched": set(train_keys[:8]),
        "meta": write_shards(root / "meta", "meta", 16, seed=1)[0],
        "val": write_shards(root / "val", "val", 12, seed=2)[0],
        "ood": OodSets(id_images=write_image_folder(root / "id", ID_CLASSES, 4, seed=3),
                       ood_images={"colours": write_image_folder(root / "ood", OOD_CLASSES, 4, seed=4)},
                       classes=list(ID_CLASSES), templates=["a {} square"], scores=("mcm", "energy")),
        "classes": str(classes),
    }


def base_raw(data: dict, **sections) -> dict:
    raw = {
        "seed": 0,
        "model": {"name": "mmsphere-tiny"},
        "data": {"train": [{"urls": data["train"], "modality": "image"}],
                 "meta": {"urls": data["meta"], "modality": "image"},
                 "val": {"urls": data["val"], "modality": "image"},
                 "shuffle_buffer": 8, "epoch_samples": 32},
        "loss": {"terms": {"angular_margin": {"weight": 1.0, "margin": 0.2}}},
        "meta": {"hidden": 8},
        "train": {"max_steps": STEPS, "batch_size": 8, "lr": 1e-3, "warmup_steps": 1, "checkpoint_every": STEPS,
                  "log_every": 1, "cpu": True},
    }
    for section, values in sections.items():
        raw[section].update(values)
    return raw


@pytest.fixture(scope="module")
def study(study_data, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("ablation")
    results = run_ablation(config_from_dict(base_raw(study_data)), VARIANTS, SEEDS, out, zero_shot=True,
                           ood=study_data["ood"], mismatched_keys=study_data["mismatched"], eval_batch_size=16)
    return out, results


def test_every_run_is_trained_with_its_variant_and_seed(study):
    out, _ = study
    written = json.loads((out / "ablation.json").read_text())
    assert [(run["variant"], run["seed"]) for run in written["runs"]] == \
        [("zero-shot", 0), ("zero-shot", 1), ("clip", 0), ("clip", 1), ("meta", 0), ("meta", 1)]
    for variant in VARIANTS:
        for seed in SEEDS:
            run_dir = out / variant / f"seed_{seed}"
            saved = yaml.safe_load((run_dir / "config.yaml").read_text())
            assert saved["seed"] == seed and saved["train"]["max_steps"] == STEPS
            # the base config's other settings are kept: its margin goes with the angular margin term
            assert saved["loss"]["terms"] == ({"clip": 1.0} if variant == "clip" else
                                              {"angular_margin": {"weight": 1.0, "margin": 0.2}})
            assert saved["meta"]["enabled"] == (variant == "meta")
            assert json.loads((run_dir / "summary.json").read_text())["steps"] == STEPS
            assert (run_dir / "sample_weights.jsonl").is_file() == (variant == "meta")
    assert not (out / "zero-shot" / "seed_0" / "model.safetensors").exists(), "zero-shot rows are not trained"
    assert (out / "ablation.md").is_file() and (out / "ablation.png").stat().st_size > 0


def test_numbers_are_those_of_the_saved_runs(study, study_data):
    out, results = study
    run = next(run for run in results["runs"] if run["variant"] == "meta" and run["seed"] == 1)
    again = evaluate_retrieval_loader(load_run(out / "meta" / "seed_1"), study_data["val"], modality="image",
                                      batch_size=16)
    for key in ("t2v/R@1", "t2v/MnR", "v2t/R@5", "geometry/modality_gap"):
        assert run["metrics"][key] == pytest.approx(again[key], abs=1e-9), key
    assert run["metrics"]["time/train_s"] > 0 and run["metrics"]["time/eval_s"] > 0

    # OoD: the metrics follow from the per-sample scores saved beside the run
    scores = np.load(out / "meta" / "seed_1" / "ood_scores.npz")
    for score in ("mcm", "energy"):
        labels = np.r_[np.ones(len(scores[f"{score}/id"])), np.zeros(len(scores[f"{score}/colours"]))]
        expected = roc_auc_score(labels, np.r_[scores[f"{score}/id"], scores[f"{score}/colours"]])
        assert run["metrics"][f"ood/{score}/colours/AUROC"] == pytest.approx(expected, abs=1e-12)
        assert run["metrics"][f"ood/{score}/mean/AUROC"] == run["metrics"][f"ood/{score}/colours/AUROC"]
    assert len(scores["mcm/id"]) == 2 * 4 and len(scores["mcm/colours"]) == 2 * 4

    # learned weights: mean weight per pair over the second half of training, clean pairs positive
    rows = [json.loads(line) for line in (out / "meta" / "seed_1" / "sample_weights.jsonl").read_text().splitlines()]
    per_key: dict[str, list[float]] = {}
    for row in rows:
        if row["step"] > STEPS / 2:
            per_key.setdefault(row["key"], []).append(row["weight"])
    keys = sorted(per_key)
    clean = [key not in study_data["mismatched"] for key in keys]
    assert 0 < sum(clean) < len(clean), "the last step's batch holds clean and mismatched pairs"
    expected = roc_auc_score(clean, [np.mean(per_key[key]) for key in keys])
    assert run["metrics"]["weights/auroc_clean_vs_mismatched"] == pytest.approx(expected, abs=1e-12)
    assert not any(key.startswith("weights/") for other in results["runs"] if other["variant"] != "meta"
                   for key in other["metrics"])


def test_mean_and_std_over_seeds(study):
    out, _ = study
    written = json.loads((out / "ablation.json").read_text())
    markdown = (out / "ablation.md").read_text()
    for variant in ["zero-shot", *VARIANTS]:
        values = {key: [run["metrics"][key] for run in written["runs"] if run["variant"] == variant]
                  for key in ("t2v/R@1", "v2t/R@5", "geometry/alignment", "ood/mcm/mean/AUROC")}
        for key, seed_values in values.items():
            summary = written["aggregate"][variant][key]
            assert summary["n"] == len(SEEDS)
            assert summary["mean"] == pytest.approx(statistics.fmean(seed_values), abs=1e-12)
            assert summary["std"] == pytest.approx(statistics.stdev(seed_values), abs=1e-12)
        row = next(line for line in markdown.splitlines() if line.startswith(f"| {variant} |") and "±" in line)
        expected_cell = f"{statistics.fmean(values['t2v/R@1']):.1f} ± {statistics.stdev(values['t2v/R@1']):.1f}"
        assert row.split(" | ")[1] == expected_cell


def test_finished_runs_are_reused_and_other_configs_refused(study, study_data, tmp_path):
    # a copy: run_ablation rewrites ablation.json, which the module's other tests read
    out, results = study
    out = Path(shutil.copytree(out, tmp_path / "study"))
    before = (out / "clip" / "seed_0" / "model.safetensors").stat().st_mtime_ns
    again = run_ablation(config_from_dict(base_raw(study_data)), ["clip"], [0], out, ood=study_data["ood"],
                         mismatched_keys=study_data["mismatched"])
    assert again["runs"][0]["metrics"] == next(run["metrics"] for run in results["runs"]
                                               if (run["variant"], run["seed"]) == ("clip", 0))
    assert (out / "clip" / "seed_0" / "model.safetensors").stat().st_mtime_ns == before
    with pytest.raises(MmsphereError, match=r"clip/seed_0' holds a run of another config \(train.lr: 0.001 there"):
        run_ablation(config_from_dict(base_raw(study_data, train={"lr": 0.01})), ["clip"], [0], out)


def test_a_moved_run_is_evaluated_again_for_other_sets_without_training(study, study_data, tmp_path):
    out, results = study
    shutil.copytree(out / "clip" / "seed_1", tmp_path / "moved" / "clip" / "seed_1")
    weights = tmp_path / "moved" / "clip" / "seed_1" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    again = run_ablation(config_from_dict(base_raw(study_data)), ["clip"], [1], tmp_path / "moved")
    original = next(run for run in results["runs"] if (run["variant"], run["seed"]) == ("clip", 1))["metrics"]
    metrics = again["runs"][0]["metrics"]
    assert weights.stat().st_mtime_ns == before and "time/train_call_s" not in metrics, "not trained again"
    assert not any(key.startswith(("ood/", "weights/")) for key in metrics), "evaluated without OoD sets and keys"
    for key in ("t2v/R@1", "v2t/MnR", "geometry/uniformity_union"):
        assert metrics[key] == original[key], key


def test_command_line_continues_a_finished_study(study, study_data, tmp_path, capsys):
    out, results = study
    config = tmp_path / "base.yaml"
    config.write_text(yaml.safe_dump(base_raw(study_data)))
    keys = tmp_path / "mismatched.json"
    keys.write_text(json.dumps({"mismatched_keys": sorted(study_data["mismatched"])}))
    templates = tmp_path / "templates.txt"
    templates.write_text("a {} square\n")
    ood = study_data["ood"]
    assert main(["--config", str(config), "--variants", ",".join(VARIANTS), "--seeds", str(len(SEEDS)), "--zero-shot",
                 "--out", str(out), "--ood-id", ood.id_images, "--ood", f"colours={ood.ood_images['colours']}",
                 "--classes", study_data["classes"], "--templates", str(templates),
                 "--mismatched-keys", str(keys)]) == 0
    printed = capsys.readouterr().out
    written = json.loads((out / "ablation.json").read_text())
    assert [run["metrics"] for run in written["runs"]] == [run["metrics"] for run in results["runs"]], "all reused"
    assert written["description"]["command"][:3] == ["scripts/ablate.py", "--config", str(config)]
    summary = written["aggregate"]["clip"]["t2v/R@1"]
    assert f"| clip | {summary['mean']:.1f} ± {summary['std']:.1f} |" in printed


def test_aggregate_skips_missing_metrics_and_single_seeds():
    runs = [{"variant": "a", "metrics": {"x": 1.0, "y": 2.0}}, {"variant": "a", "metrics": {"x": 4.0}},
            {"variant": "b", "metrics": {"x": 5.0}}]
    summary = aggregate(runs)
    assert summary["a"]["x"] == {"mean": 2.5, "std": pytest.approx(2.1213203435596424), "n": 2}
    assert summary["a"]["y"] == {"mean": 2.0, "std": None, "n": 1}
    assert summary["b"] == {"x": {"mean": 5.0, "std": None, "n": 1}}
    assert mean_and_std([3.0, 3.0, 3.0])["std"] == 0.0


def test_variants_are_valid_configs_of_their_techniques(study_data, tmp_path):
    base = config_from_dict(base_raw(study_data, loss={"terms": {"clip": 1.0, "m2mix": 0.5}}, meta={"enabled": True}))
    expected_terms = {"clip": {"clip"}, "margin": {"angular_margin"}, "meta": {"angular_margin"},
                      "m2mix": {"angular_margin", "m2mix"}, "calunif": {"angular_margin", "calibrated_uniformity"},
                      "cma": {"angular_margin", "cma"},
                      "all": {"angular_margin", "m2mix", "calibrated_uniformity", "cma"}}
    for variant, terms in expected_terms.items():
        config = variant_config(base, variant, seed=7, output_dir=tmp_path / variant)
        assert set(config.loss.terms) == terms, variant
        assert config.meta.enabled == (variant in ("meta", "all")), variant
        assert (config.seed, config.output_dir) == (7, str(tmp_path / variant))


@pytest.mark.parametrize(("variant", "term", "weight"), [
    ("cma@0.1", "cma", 0.1), ("m2mix@0.5", "m2mix", 0.5), ("calunif@2", "calibrated_uniformity", 2.0),
    ("cma@1e-2", "cma", 0.01),
])
def test_a_technique_variant_takes_another_weight(study_data, tmp_path, variant, term, weight):
    config = variant_config(config_from_dict(base_raw(study_data)), variant, seed=0, output_dir=tmp_path)
    assert config.loss.terms == {"angular_margin": {"weight": 1.0, "margin": 0.2}, term: weight}  # the base's margin
    assert not config.meta.enabled
    # the named variant itself keeps its default weight
    assert variant_config(config_from_dict(base_raw(study_data)), variant.partition("@")[0], seed=0,
                          output_dir=tmp_path).loss.terms[term] != weight


@pytest.mark.parametrize(("variant", "terms"), [
    ("angular_margin:margin=0.3", {"angular_margin": {"weight": 1.0, "margin": 0.3}}),
    ("siglip:margin=0.1", {"siglip": {"weight": 1.0, "margin": 0.1}}),
    ("cma@0.01:weight=0.02", {"angular_margin": {"weight": 1.0, "margin": 0.2}, "cma": {"weight": 0.02}}),
])
def test_a_variant_takes_its_terms_options(study_data, tmp_path, variant, terms):
    """NAME:FIELD=VALUE sets fields of the variant's own term (over the base's margin 0.2); the other terms keep the
    variant's weights with the base config's fields."""
    config = variant_config(config_from_dict(base_raw(study_data)), variant, seed=0, output_dir=tmp_path)
    assert config.loss.terms == terms


@pytest.mark.parametrize(("text", "names"), [
    ("clip,meta", ["clip", "meta"]),
    ("cam_softmax:c_stop=1.45,c_decay=0.001,clip", ["cam_softmax:c_stop=1.45,c_decay=0.001", "clip"]),
    ("sface:k=20,a=0.8,b=1.23,sface+meta:k=20", ["sface:k=20,a=0.8,b=1.23", "sface+meta:k=20"]),
    ("cma@0.1,margin", ["cma@0.1", "margin"]),
])
def test_variants_text_keeps_a_variants_several_options_together(text, names):
    assert split_variants(text) == names


@pytest.mark.parametrize(("variant", "terms"), [
    ("cosface+meta:margin=0.2", {"cosface": {"weight": 1.0, "margin": 0.2}}),
    ("clip+meta", {"clip": 1.0}),
    ("cma@0.01+meta", {"angular_margin": {"weight": 1.0, "margin": 0.2}, "cma": 0.01}),
])
def test_plus_meta_turns_meta_weighting_on_for_any_variant(study_data, tmp_path, variant, terms):
    """NAME+meta is the variant NAME (its terms and options unchanged) with meta weighting on; NAME alone is off."""
    base = config_from_dict(base_raw(study_data))
    config = variant_config(base, variant, seed=0, output_dir=tmp_path)
    assert config.loss.terms == terms and config.meta.enabled
    without = variant.replace("+meta", "")
    assert variant_config(base, without, seed=0, output_dir=tmp_path).loss.terms == terms
    assert not variant_config(base, without, seed=0, output_dir=tmp_path).meta.enabled


@pytest.mark.parametrize(("change", "message"), [
    (dict(variants=["clip+mtea"]), r"variant clip\+mtea: only '\+meta' may follow a variant's name"),
    (dict(variants=["clip", "margni"]), r"unknown variant\(s\) \['margni'\]; known: clip, angular_margin"),
    (dict(variants=["clip", "clip"]), r"variant\(s\) \['clip'\] are listed more than once"),
    (dict(variants=["cma@x"]), r"variant 'cma@x': weight 'x' is not a number"),
    (dict(variants=["cma@-1"]), r"variant 'cma@-1': weight '-1' must be a finite number > 0"),
    (dict(variants=["cma@nan"]), r"variant 'cma@nan': weight 'nan' must be a finite number > 0"),
    (dict(variants=["meta@0.1"]), r"variant 'meta@0.1': only the terms added to the baseline \(m2mix, calibrated_uniformity, cma\) take @WEIGHT"),
    (dict(variants=["cam@0.1"]), r"unknown variant\(s\) \['cam@0.1'\]"),
    (dict(variants=["cma@0.1", "cma@0.1"]), r"variant\(s\) \['cma@0.1'\] are listed more than once"),
    (dict(seeds=[]), r"seeds=\[\] must be one or more integers"),
    (dict(seeds=[1, 1]), r"seeds=\[1, 1\] holds repeats"),
    (dict(raw={"data": {"meta": None}}), r"variant 'meta': meta.enabled=true needs data.meta"),
    (dict(raw={"data": {"val": None}}), r"data.val is not set"),
    (dict(ood=OodSets("nowhere", {"x": "nowhere/either"}, ["a", "b"])), r"OoD image set id='nowhere'"),
    (dict(ood=OodSets("nowhere", {}, ["a", "b"])), r"OoD image set id='nowhere'"),
    (dict(ood=OodSets("nowhere", {"x": "y"}, ["a", "b"], scores=("neglabel",))), r"neglabel OoD score needs negative labels"),
    (dict(variants=["siglip:margn=0.1"]), r"variant 'siglip:margn=0.1': loss.terms.siglip: unknown field 'margn'"),
    (dict(variants=["clip:0.1"]), r"'0.1' is not FIELD=VALUE"),
    (dict(variants=["meta:margin=0.1"]), r"only a term's variant takes :FIELD=VALUE options"),
])
def test_bad_studies_fail_before_any_training(study_data, tmp_path, change, message):
    raw = base_raw(study_data)
    for section, values in change.get("raw", {}).items():
        raw[section].update(values)
    with pytest.raises((ConfigError, MmsphereError, FileNotFoundError), match=message):
        run_ablation(config_from_dict(raw), change.get("variants", ["clip", "meta"]), change.get("seeds", [0]),
                     tmp_path / "out", ood=change.get("ood"))
    assert not (tmp_path / "out").exists()


def test_command_line_errors(study_data, tmp_path, capsys):
    config = tmp_path / "base.yaml"
    config.write_text(yaml.safe_dump(base_raw(study_data)))
    common = ["--config", str(config), "--out", str(tmp_path / "out"), "--variants", "clip"]
    assert main([*common, "--ood", "other=somewhere", "--classes", study_data["classes"]]) == 2
    assert "needs --ood-id and --classes; missing --ood-id" in capsys.readouterr().err
    assert main([*common, "--ood-id", "somewhere", "--classes", study_data["classes"]]) == 2
    assert "OoD image set id='somewhere' is neither a folder nor existing shards" in capsys.readouterr().err
    assert main([*common, "--ood-id", "somewhere", "--classes", study_data["classes"], "--ood", "o=x",
                 "--ood-scores", "neglabel"]) == 2
    assert "the neglabel OoD score needs negative labels (--neg-labels FILE)" in capsys.readouterr().err
    assert main([*common, "--seeds", "0"]) == 2
    assert "--seeds=0 must be >= 1" in capsys.readouterr().err
    assert main([*common, "train.max_step=3"]) == 2
    assert "unknown config key train.max_step; did you mean train.max_steps?" in capsys.readouterr().err
    assert main([*common, "--mismatched-keys", str(tmp_path / "none.json")]) == 2
    assert re.search(r"mismatched-keys file .*none.json' does not exist", capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_markdown_names_terms_given_with_their_fields_and_an_accuracy_only_evaluation(study):
    """A variant's terms in the long form print with their fields; an evaluation without OoD sets prints the ID accuracy."""
    results = json.loads(json.dumps(study[1]))
    results["variants"]["clip"] = {"loss.terms": {"siglip": {"weight": 1.0, "margin": 0.1}}, "meta.enabled": False}
    results["ood"]["ood_images"] = {}
    text = ablation_markdown(results)
    assert "| clip | siglip 1 (margin=0.1) | off |" in text
    assert "## ID accuracy (prompt classification of red, green)" in text and "## OoD detection" not in text


def test_sface_ab_is_the_mean_of_each_first_batchs_angle_quantiles(study_data, tmp_path, capsys):
    """`mmsphere sface-ab`: a, b = the mean over the first batches of numpy quantiles of loop-computed angles."""
    from mmsphere.cli import run_command
    from mmsphere.data.mixing import build_train_stream
    from mmsphere.models import create_run_model
    from mmsphere.train.sface_ab import measured_sface_ab

    config = config_from_dict(base_raw(study_data))
    a, b = measured_sface_ab(config, batches=2, positive_quantile=0.25, negative_quantile=0.75)
    model = create_run_model(config).eval()
    stream = build_train_stream(config.data.train, config.data, batch_size=8, image_size=model.image_size,
                                image_mean=model.image_mean, image_std=model.image_std, tokenizer=model.tokenizer,
                                seed=config.seed)
    expected_a, expected_b = [], []
    for _, batch in zip(range(2), stream):
        with torch.no_grad():
            features = model(**batch.encoder_inputs())
        img, txt = features["image_features"].double().numpy(), features["text_features"].double().numpy()
        positive, negative = [], []
        for i in range(len(img)):
            for j in range(len(txt)):
                angle = math.acos(max(-1.0, min(1.0, float(np.dot(img[i], txt[j])))))
                (positive if i == j else negative).append(angle)
        expected_a.append(np.quantile(positive, 0.25))
        expected_b.append(np.quantile(negative, 0.75))
    assert a == pytest.approx(np.mean(expected_a), abs=1e-6) and b == pytest.approx(np.mean(expected_b), abs=1e-6)
    assert 0 < a < b < math.pi
    config_file = tmp_path / "base.yaml"
    config_file.write_text(yaml.safe_dump(base_raw(study_data)))
    assert run_command("sface-ab", ["--config", str(config_file), "--batches", "2", "--positive-quantile", "0.25",
                                    "--negative-quantile", "0.75"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["a"] == pytest.approx(a, abs=1e-4) and printed["b"] == pytest.approx(b, abs=1e-4)
    assert printed["override"] == f"loss.terms.sface.a={a:.4f} loss.terms.sface.b={b:.4f}"
