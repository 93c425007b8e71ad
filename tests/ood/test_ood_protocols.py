"""OoD suites by name (``score-ood --protocol``) on tiny image sets in the usual folder and list layouts.

Checks the per-set FPR@95/AUROC against scikit-learn on the written per-sample scores, the near and
far means, the card, and that a set losing images (or a whole set missing) stops the run unless allowed.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from sklearn import metrics as sk

from mmsphere.cli import main as mmsphere
from mmsphere.ood.cli import main
from mmsphere.ood.protocols import CIFAR10_CLASSES, OOD_PROTOCOLS
from tests.ood.conftest import write_image


def last_line(text: str) -> str:
    return text.rstrip("\n").split("\n")[-1].split("\r")[-1]


def images(folder: Path, count: int, seed: int, suffix: str = ".png") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        path = folder / f"{index}{suffix}"
        write_image(path, tuple(int(value) for value in rng.integers(0, 256, size=3)), seed=seed + index)
        paths.append(path)
    return paths


@pytest.fixture
def cifar_root(tmp_path) -> Path:
    """CIFAR-10 test as class folders, CIFAR-100 near, and the far sets in their usual folders (Places365 as a list)."""
    root = tmp_path / "ood_data"
    for index, name in enumerate(CIFAR10_CLASSES[:4]):
        images(root / "cifar10" / "test" / name, 1, seed=index)
    for index, name in enumerate(("aquarium_fish", "maple_tree")):
        images(root / "cifar100" / "test" / name, 1, seed=20 + index)
    images(root / "svhn", 2, seed=30)
    images(root / "dtd" / "images" / "banded", 2, seed=40, suffix=".jpg")
    images(root / "places", 2, seed=50)
    (root / "places_list.txt").write_text("places/0.png 0\nplaces/1.png 0\n")
    images(root / "LSUN", 2, seed=60)
    images(root / "iSUN", 2, seed=70)
    return root


def scores_by_set(path: Path) -> dict[str, np.ndarray]:
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    found: dict[str, list[float]] = {}
    for row in rows:
        found.setdefault(row["set"], []).append(float(row["score"]))
    return {name: np.array(values) for name, values in found.items()}


def test_cifar10_suite_per_set_and_mean_near_far(run_dir, cifar_root, tmp_path, capsys):
    out = tmp_path / "results.json"
    assert main(["--run", str(run_dir), "--protocol", "cifar10", "--data-root", str(cifar_root),
                 "--set", f"places365={cifar_root / 'places_list.txt'}", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    card = json.loads(out.read_text())
    assert card["kind"] == "ood" and card["protocol"]["name"] == "cifar10" and card["protocol"]["version"] == "1"
    sets = ["cifar100", "svhn", "textures", "places365", "lsun", "isun"]
    assert list(card["ood"]) == sets
    assert {name: card["ood"][name]["role"] for name in sets} == {"cifar100": "near", **{n: "far" for n in sets[1:]}}
    scores = scores_by_set(tmp_path / "results.scores.csv")
    for name in sets:
        labels = np.r_[np.ones(len(scores["id"])), np.zeros(len(scores[name]))].astype(bool)
        values = np.r_[scores["id"], scores[name]]
        fpr, tpr, _ = sk.roc_curve(labels, values, drop_intermediate=False)
        assert card["metrics"][name]["AUROC"] == pytest.approx(sk.roc_auc_score(labels, values))
        assert card["metrics"][name]["FPR95"] == pytest.approx(fpr[np.argmax(tpr >= 0.95)])
    for key in ("FPR95", "AUROC"):
        assert card["group_means"]["near"][key] == pytest.approx(card["metrics"]["cifar100"][key])
        assert card["group_means"]["far"][key] == pytest.approx(np.mean([card["metrics"][n][key] for n in sets[1:]]))
        assert card["metrics"]["mean"][key] == pytest.approx(np.mean([card["metrics"][n][key] for n in sets]))
    assert card["id"]["n_listed"] == card["id"]["n_evaluated"] == 4 and card["id"]["subset"] is False
    assert card["id"]["media"]["count"] == 4 and card["ood"]["places365"]["media"]["count"] == 2
    assert card["id"]["accuracy"] is not None  # folder names are CIFAR-10 class names
    assert card["classes"]["names"] == list(CIFAR10_CLASSES)
    assert card["ood"]["places365"]["spec"] == str(cifar_root / "places_list.txt")
    for text in ("mean near", "mean far", "FPR@95 %", "AUROC %"):
        assert text in printed
    markdown = out.with_suffix(".md").read_text()
    assert "| mean far | far |" in markdown and "Evaluated on a subset" not in markdown

    # an OoD card compared with one whose SVHN images and score differ
    other = json.loads(out.read_text())
    other["ood"]["svhn"]["media"]["sha256"] = "0" * 64
    other["score"] = "energy"
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert mmsphere(["results", "compare", str(out), str(tmp_path / "other.json")]) == 0
    printed = capsys.readouterr().out
    assert "WARNING: different svhn fingerprint" in printed and "WARNING: different score (" in printed
    assert "cifar100 FPR@95 %" in printed and "WARNING: different cifar100" not in printed


def test_cifar100_reads_underscored_class_folders(run_dir, tmp_path):
    root = tmp_path / "data"
    for index, name in enumerate(("aquarium_fish", "maple_tree")):
        images(root / "CIFAR100" / name, 1, seed=index)
    for folder in ("cifar10", "svhn", "dtd", "places365", "lsun", "isun"):
        images(root / folder, 1, seed=9)
    out = tmp_path / "r.json"
    assert main(["--run", str(run_dir), "--protocol", "cifar100", "--data-root", str(root), "--out", str(out)]) == 0
    card = json.loads(out.read_text())
    assert card["id"]["accuracy"] is not None and len(card["classes"]["names"]) == 100
    assert "aquarium fish" in card["classes"]["names"]


def test_a_missing_set_stops_before_the_model_loads_unless_allowed(run_dir, cifar_root, tmp_path, capsys):
    for path in (cifar_root / "iSUN").iterdir():
        path.unlink()
    (cifar_root / "iSUN").rmdir()
    out = tmp_path / "results.json"
    arguments = ["--protocol", "cifar10", "--data-root", str(cifar_root), "--set",
                 f"places365={cifar_root / 'places_list.txt'}", "--out", str(out)]
    assert main(["--run", str(tmp_path / "no-run"), *arguments]) == 2
    error = last_line(capsys.readouterr().err)
    assert error.startswith("mmsphere score-ood: error: 1 of 7 sets of protocol cifar10 are not under")
    assert "isun (looked at" in error and "--set NAME=PATH" in error and "--allow-missing" in error
    assert not out.exists()

    assert main(["--run", str(run_dir), *arguments, "--allow-missing"]) == 0
    printed = capsys.readouterr().out
    card = json.loads(out.read_text())
    assert card["sets_missing"] == ["isun"] and "isun" not in card["ood"]
    assert "OoD sets not found and left out: isun" in out.with_suffix(".md").read_text()
    assert printed.startswith("WARNING (--allow-missing): Evaluated on a subset.")


def test_an_undecodable_image_stops_before_scoring_unless_allowed(run_dir, cifar_root, tmp_path, capsys):
    (cifar_root / "svhn" / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    out = tmp_path / "results.json"
    arguments = ["--run", str(run_dir), "--protocol", "cifar10", "--data-root", str(cifar_root), "--set",
                 f"places365={cifar_root / 'places_list.txt'}", "--out", str(out)]
    assert main(arguments) == 2
    captured = capsys.readouterr()
    error = last_line(captured.err)
    assert "1 of 3 images of set svhn" in error and "image_decode_error" in error
    assert "stopped before scoring (found while decoding)" in error and "AUROC" not in captured.out
    assert not out.exists()

    assert main([*arguments, "--allow-missing"]) == 0
    card = json.loads(out.read_text())
    svhn = card["ood"]["svhn"]
    assert (svhn["n_listed"], svhn["n_evaluated"], svhn["subset"]) == (3, 2, True)
    assert svhn["missing"]["by_reason"] == {"image_decode_error": 1}
    assert Path(svhn["missing"]["file"]).read_text().count("svhn: ") == 1
    assert "OoD set svhn: 2 of 3 listed images evaluated" in out.with_suffix(".md").read_text()


def test_a_list_naming_a_missing_image_stops_before_the_model_loads(cifar_root, tmp_path, capsys):
    (cifar_root / "places_list.txt").write_text("places/0.png 0\nplaces/gone.png 0\n")
    assert main(["--run", str(tmp_path / "no-run"), "--protocol", "cifar10", "--data-root", str(cifar_root),
                 "--set", f"places365={cifar_root / 'places_list.txt'}", "--out", str(tmp_path / "r.json")]) == 2
    error = last_line(capsys.readouterr().err)
    assert "1 of 16 images of the ID and OoD sets are missing" in error and "places365: " in error
    assert "gone.png" in error and "stopped before encoding" in error


def test_imagenet_mos_needs_the_class_names(run_dir, tmp_path, capsys):
    root = tmp_path / "data"
    for wnid, seed in (("n01440764", 0), ("n01443537", 1)):
        images(root / "imagenet" / "val" / wnid, 1, seed=seed, suffix=".JPEG")
    for folder in ("iNaturalist", "SUN", "Places", "dtd/images"):
        images(root / folder, 1, seed=5)
    arguments = ["--run", str(run_dir), "--protocol", "imagenet1k-mos", "--data-root", str(root),
                 "--out", str(tmp_path / "r.json")]
    assert main(arguments) == 2
    assert "protocol imagenet1k-mos needs --classes FILE" in capsys.readouterr().err
    (tmp_path / "classes.txt").write_text("tench\ngoldfish\n")
    assert main([*arguments, "--classes", str(tmp_path / "classes.txt")]) == 0
    card = json.loads((tmp_path / "r.json").read_text())
    assert list(card["ood"]) == ["inaturalist", "sun", "places", "textures"]
    assert set(card["group_means"]) == {"far"} and card["id"]["accuracy"] is None  # wnid folders


def test_suites_are_registered_definitions():
    assert {"cifar10", "cifar100", "imagenet1k-mos"} <= set(OOD_PROTOCOLS)
    cifar10 = OOD_PROTOCOLS["cifar10"]
    assert [spec.name for spec in cifar10.ood_sets] == ["cifar100", "svhn", "textures", "places365", "lsun", "isun"]
    assert [spec.name for spec in OOD_PROTOCOLS["imagenet1k-mos"].ood_sets] == ["inaturalist", "sun", "places",
                                                                                "textures"]


def test_protocols_name_shows_an_ood_suite_in_full(capsys):
    assert mmsphere(["protocols", "imagenet1k-mos"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("imagenet1k-mos (version 1): ImageNet-1k val as ID")
    assert "  id set imagenet: first of imagenet/val, ImageNet/val, imagenet_val, val under --data-root — " \
           "ImageNet-1k val" in lines
    assert "  far set sun: first of SUN, sun under --data-root — SUN (MOS subset, 10,000 images)" in lines
    assert "  classes: --classes FILE" in lines and "  reports: FPR95, AUROC per set, mean per role and overall" in lines
    assert mmsphere(["protocols", "cifar10"]) == 0
    assert "  classes: 10 shipped" in capsys.readouterr().out.splitlines()
