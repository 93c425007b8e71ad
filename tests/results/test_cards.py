"""Results cards (``results.json`` + ``results.md``) and ``mmsphere results compare`` on cards written by real runs."""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from mmsphere.cli import main as mmsphere
from mmsphere.results import compare_cards, load_card
from tests.eval.conftest import CAPTIONS


@pytest.fixture(scope="module")
def benchmark(media, tmp_path_factory) -> Path:
    """An MSR-VTT 1k-A folder: the JSFusion CSV and its four videos."""
    root = tmp_path_factory.mktemp("msrvtt")
    (root / "videos").mkdir()
    with open(root / "MSRVTT_JSFUSION_test.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["key", "vid_key", "video_id", "sentence"])
        for index, key in enumerate(list(CAPTIONS)[:4]):
            writer.writerow([f"ret{index}", f"msr{index}", key, CAPTIONS[key][0]])
            shutil.copyfile(media / f"{key}.mp4", root / "videos" / f"{key}.mp4")
    return root


def evaluate(run_dir: Path, root: Path, out: Path, *extra: str) -> dict:
    assert mmsphere(["eval-retrieval", "--run", str(run_dir), "--protocol", "msrvtt-1k-a", "--media-root",
                     str(root / "videos"), "--annotations", str(root), "--out", str(out), *extra]) == 0
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def cards(run_dir, benchmark, tmp_path_factory) -> dict[str, Path]:
    """Cards of the same benchmark at 2 and 3 frames, and again at 2 frames."""
    folder = tmp_path_factory.mktemp("cards")
    evaluate(run_dir, benchmark, folder / "a" / "results.json", "--frames", "2")
    evaluate(run_dir, benchmark, folder / "b" / "results.json", "--frames", "2", "--dsl")
    evaluate(run_dir, benchmark, folder / "c" / "results.json", "--frames", "3")
    return {name: folder / name / "results.json" for name in "abc"}


def test_a_card_records_what_the_numbers_depend_on(cards, run_dir, benchmark):
    card = load_card(cards["a"])
    assert card["card_version"] == 1 and card["kind"] == "retrieval"
    assert card["protocol"]["name"] == "msrvtt-1k-a" and card["protocol"]["version"] == "1"
    csv_bytes = (benchmark / "MSRVTT_JSFUSION_test.csv").read_bytes()
    assert card["data"]["list_sha256"] == hashlib.sha256(csv_bytes).hexdigest()
    lines = sorted(f"{key}\t{key}.mp4\t{(benchmark / 'videos' / f'{key}.mp4').stat().st_size}\n"
                   for key in list(CAPTIONS)[:4])
    assert card["data"]["media"] == {"count": 4, "sha256": hashlib.sha256("".join(lines).encode()).hexdigest(),
                                     "total_bytes": sum(int(line.split("\t")[2]) for line in lines)}
    assert card["model"]["run_dir"] == str(run_dir.resolve())
    assert card["model"]["config_sha256"] == hashlib.sha256((run_dir / "config.yaml").read_bytes()).hexdigest()
    assert card["data"]["frames"] == 2 and card["data"]["frame_sampling"].startswith("uniform")
    assert card["precision"] == {"encoders": "float32", "scores": "float32"}
    assert {"torch", "open-clip-torch", "mmsphere"} <= set(card["versions"]) and card["date"].endswith("+00:00")
    assert set(card["metrics"]) == {"t2v", "v2t"}
    assert set(card["metrics"]["t2v"]) == {"R@1", "R@5", "R@10", "MdR", "MnR"}
    markdown = cards["a"].with_suffix(".md").read_text()
    for text in ("msrvtt-1k-a (version 1)", "sha256 `", "fingerprint `", "4 of 4 listed videos", "| frames | 2;",
                 "config sha256", "| t2v (text→video) |", "torch"):
        assert text in markdown, text


def test_dsl_rows_are_labelled_post_processed(cards):
    markdown = cards["b"].with_suffix(".md").read_text()
    assert "| t2v + DSL (post-processed) |" in markdown and "DSL rows are post-processed" in markdown


def test_compare_same_benchmark_is_quiet(cards, capsys):
    assert mmsphere(["results", "compare", str(cards["a"]), str(cards["b"]), "--strict"]) == 0
    printed = capsys.readouterr().out
    assert "WARNING" not in printed and "comparable: same protocol, data and frame settings" in printed
    assert "t2v (text→video) R@1" in printed and "t2v + DSL (post-processed) R@1" in printed


def test_compare_warns_when_frame_settings_differ(cards, capsys):
    assert mmsphere(["results", "compare", str(cards["a"]), str(cards["c"])]) == 0
    printed = capsys.readouterr().out
    assert f"WARNING: different frames ({cards['a']}: 2; {cards['c']}: 3)" in printed
    assert mmsphere(["results", "compare", str(cards["a"]), str(cards["c"]), "--strict"]) == 1


def _changed(path: Path, tmp_path: Path, name: str, change) -> Path:
    card = copy.deepcopy(json.loads(path.read_text()))
    change(card)
    target = tmp_path / name
    target.write_text(json.dumps(card))
    return target


@pytest.mark.parametrize("name, change, warning", [
    ("protocol", lambda card: card["protocol"].update(name="msrvtt-full"), "different protocol"),
    ("version", lambda card: card["protocol"].update(version="2"), "different protocol version"),
    ("list", lambda card: card["data"].update(list_sha256="0" * 64), "different list digest"),
    ("media", lambda card: card["data"]["media"].update(sha256="f" * 64), "different media fingerprint"),
    ("subset", lambda card: card["data"].update(n_evaluated=3, subset=True), "different videos evaluated"),
    ("sampling", lambda card: card["data"].update(frame_sampling="random offsets"), "different frame sampling"),
])
def test_compare_flags_protocol_and_data_mismatches(name, change, warning, cards, tmp_path, capsys):
    other = _changed(cards["a"], tmp_path, f"{name}.json", change)
    assert mmsphere(["results", "compare", str(cards["a"]), str(other), "--strict"]) == 1
    printed = capsys.readouterr().out
    assert f"WARNING: {warning}" in printed and "the numbers are not comparable" in printed


def test_compare_cards_from_python(cards):
    comparison = compare_cards({"a": load_card(cards["a"]), "c": load_card(cards["c"])})
    assert comparison.header == ["", "a", "c"]
    assert any(row[0] == "frames" and row[1:] == ["2", "3"] for row in comparison.rows)
    assert [warning.split(" (")[0] for warning in comparison.warnings] == ["different frames"]


def test_compare_refuses_what_is_not_a_card(cards, tmp_path, capsys):
    (tmp_path / "old.json").write_text(json.dumps({"metrics": {}}))
    assert mmsphere(["results", "compare", str(cards["a"]), str(tmp_path / "old.json")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "is not a results card" in error
    assert mmsphere(["results", "compare", str(cards["a"])]) == 2
    assert "at least two cards" in capsys.readouterr().err
    assert mmsphere(["results", "compare", str(cards["a"]), str(tmp_path / "absent.json")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_protocols_lists_every_protocol_with_its_files(capsys):
    assert mmsphere(["protocols"]) == 0
    printed = capsys.readouterr().out
    for text in ("msrvtt-1k-a", "MSRVTT_JSFUSION_test.csv", "msrvtt-full", "MSRVTT_data.json", "msvd",
                 "AllVideoDescriptions.txt", "didemo", "test_data.json", "activitynet", "val_1.json", "lsmdc",
                 "LSMDC16_challenge_1000_publictect.csv", "cifar10", "cifar100", "imagenet1k-mos", "paragraph"):
        assert text in printed, text
    assert mmsphere(["protocols", "lsmdc"]) == 0
    assert "tab-separated, no header" in capsys.readouterr().out
    assert mmsphere(["protocols", "kinetics"]) == 2
    assert "unknown protocol 'kinetics'" in capsys.readouterr().err
