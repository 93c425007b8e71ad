"""The first mistakes with ``mmsphere make-shards``, through the real command in a subprocess on real media files.

A list whose relative paths start elsewhere (no ``--media-root``) or that lacks its caption column must
explain itself in one line, exit 2, leave the output folder untouched, and let the corrected command run.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mmsphere.data.cli import LIST_COLUMNS_HELP
from mmsphere.data.sample_list import CAPTION_COLUMNS, MEDIA_COLUMNS

def make_shards(*arguments: str, cwd) -> subprocess.CompletedProcess:
    """``mmsphere make-shards ARGUMENTS`` in a fresh interpreter, as a user types it."""
    command = [sys.executable, "-m", "mmsphere.cli", "make-shards", *arguments, "--quiet"]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=120)


@pytest.fixture()
def dataset(tmp_path, media):
    """``data/media/{red,green,clip}.*`` (real PNG, JPEG, H.264) listed with paths relative to ``data/``, not ``lists/``."""
    media_folder = tmp_path / "data" / "media"
    media_folder.mkdir(parents=True)
    (media_folder / "red.png").write_bytes(media.image(20, 16, "PNG", seed=1))
    (media_folder / "green.jpg").write_bytes(media.image(20, 16, "JPEG", seed=2))
    (media_folder / "clip.mp4").write_bytes(media.video(frames=4))
    (tmp_path / "lists").mkdir()
    return tmp_path


def test_relative_paths_without_media_root_explain_themselves_and_the_retry_runs(dataset):
    listing = dataset / "lists" / "list.csv"
    listing.write_text("path,caption\nmedia/red.png,a red thing\nmedia/green.jpg,a green thing\n"
                       "media/clip.mp4,a moving thing\nmedia/more.png,one more\n")
    first = make_shards("--input", "lists/list.csv", "--out", "shards", cwd=dataset)
    assert first.returncode == 2, first.stderr
    assert "Traceback" not in first.stderr
    assert "missing                     4" in first.stdout  # the skip summary is printed before the error
    error = first.stderr.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("mmsphere make-shards: error: no media file was found")
    assert "lists/media/red.png, lists/media/green.jpg, lists/media/clip.mp4, ..." in error[0]  # the first three
    assert "--media-root" in error[0] and "'lists'" in error[0]
    assert not (dataset / "shards").exists()  # no sizes.json, no empty tar, not even the folder

    retry = make_shards("--input", "lists/list.csv", "--out", "shards", "--media-root", "data", cwd=dataset)
    assert retry.returncode == 0, retry.stderr  # no "already holds shards ... pass --overwrite"
    assert "all: 3 samples in 1 shard(s)" in retry.stdout and "missing                     1" in retry.stdout
    assert json.loads((dataset / "shards" / "sizes.json").read_text()) == {"shard-000000.tar": 3}


def test_a_failed_first_try_does_not_block_the_corrected_one(dataset):
    listing = dataset / "lists" / "list.jsonl"
    listing.write_text(json.dumps({"image": "media/red.png", "caption": "red"}) + "\n")
    assert make_shards("--input", str(listing), "--out", "shards", cwd=dataset).returncode == 2
    assert not (dataset / "shards").exists()
    (dataset / "shards").mkdir()  # an output folder that already exists, empty, is fine too
    assert make_shards("--input", str(listing), "--out", "shards", cwd=dataset).returncode == 2
    assert list((dataset / "shards").iterdir()) == []
    fixed = make_shards("--input", str(listing), "--out", "shards", "--media-root", "data", cwd=dataset)
    assert fixed.returncode == 0, fixed.stderr
    assert sorted(path.name for path in (dataset / "shards").iterdir()) == ["shard-000000.tar", "sizes.json"]


def test_a_wrong_media_root_keeps_earlier_shards(dataset):
    listing = dataset / "lists" / "list.csv"
    listing.write_text("path,caption\nmedia/red.png,a red thing\n")
    assert make_shards("--input", str(listing), "--out", "shards", "--media-root", "data", cwd=dataset).returncode == 0
    before = (dataset / "shards" / "shard-000000.tar").read_bytes()
    wrong = make_shards("--input", str(listing), "--out", "shards", "--media-root", "lists", "--overwrite",
                        cwd=dataset)
    assert wrong.returncode == 2
    assert "relative paths start from --media-root 'lists'" in wrong.stderr
    assert (dataset / "shards" / "shard-000000.tar").read_bytes() == before  # nothing replaced by nothing
    assert json.loads((dataset / "shards" / "sizes.json").read_text()) == {"shard-000000.tar": 1}


@pytest.mark.parametrize("name, text", [
    ("list.csv", "path,text\nmedia/red.png,a red thing\nmedia/green.jpg,a green thing\n"),
    ("list.tsv", "image\tdescription\nmedia/red.png\ta red thing\n"),
    ("list.jsonl", json.dumps({"path": "media/red.png", "text": "a red thing"}) + "\n"),
])
def test_a_list_without_a_caption_column_says_so(dataset, name, text):
    (dataset / "lists" / name).write_text(text)
    result = make_shards("--input", f"lists/{name}", "--out", "shards", "--media-root", "data", cwd=dataset)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "no_caption" not in result.stdout
    error = result.stderr.strip().splitlines()
    assert len(error) == 1 and "has no caption column" in error[0]
    assert "expected caption (one text) or captions" in error[0] and "found: " in error[0]
    assert not (dataset / "shards").exists()


def test_help_and_readme_document_every_list_column():
    result = subprocess.run([sys.executable, "-m", "mmsphere.cli", "make-shards", "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert LIST_COLUMNS_HELP in result.stdout
    for column in (*MEDIA_COLUMNS, *CAPTION_COLUMNS, "key", "split", "group", "video_id", "sentence"):
        assert column in LIST_COLUMNS_HELP, column
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("#### The sample list", 1)[1].split("\n#", 1)[0]
    for column in (*MEDIA_COLUMNS, *CAPTION_COLUMNS, "key", "split", "group", "video_id", "sentence"):
        assert f"`{column}`" in section, column
