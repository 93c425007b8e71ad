"""No silent results on incomplete data (issue 25): missing or undecodable items stop a run unless allowed.

The run that prompted it: MSR-VTT 1k-A with almost every video missing printed "N samples skipped"
and R@1 on the rest, exit 0. Now it stops before the model loads with one line, and with
``--allow-missing`` every output says it is a subset.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest

from mmsphere.eval.cli import main
from tests.eval.conftest import CAPTIONS


def last_line(text: str) -> str:
    return text.rstrip("\n").split("\n")[-1].split("\r")[-1]


def msrvtt_1ka(folder: Path, media: Path, listed: int, present: int) -> Path:
    """A 1k-A CSV naming ``listed`` videos of which only the first ``present`` exist under ``folder/videos``."""
    (folder / "videos").mkdir(parents=True)
    with open(folder / "MSRVTT_JSFUSION_test.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["key", "vid_key", "video_id", "sentence"])
        for index in range(listed):
            writer.writerow([f"ret{index}", f"msr{7010 + index}", f"video{7010 + index}", f"caption {index}"])
            if index < present:
                shutil.copyfile(media / f"video{index % len(CAPTIONS)}.mp4",
                                folder / "videos" / f"video{7010 + index}.mp4")
    return folder / "MSRVTT_JSFUSION_test.csv"


@pytest.mark.parametrize("how", ["protocol", "list"])
def test_missing_media_stop_the_run_before_the_model_loads(how, media, tmp_path, capsys):
    listing = msrvtt_1ka(tmp_path, media, listed=50, present=3)
    data = (["--protocol", "msrvtt-1k-a", "--annotations", str(tmp_path)] if how == "protocol"
            else ["--list", str(listing)])
    out = tmp_path / "results.json"
    # a run directory that does not exist: the data check must come first
    code = main(["--run", str(tmp_path / "no-run"), *data, "--media-root", str(tmp_path / "videos"),
                 "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert captured.err.count("\n") == 1
    error = last_line(captured.err)
    what = "videos of protocol msrvtt-1k-a" if how == "protocol" else "samples of"
    assert error.startswith(f"mmsphere eval-retrieval: error: 47 of 50 {what}")
    assert "47 missing" in error and "stopped before encoding" in error
    assert "video7013, video7014, video7015, video7016, video7017, ..." in error
    assert "--allow-missing" in error
    assert not out.exists() and not out.with_suffix(".md").exists()
    names = (tmp_path / "results.missing.txt").read_text().splitlines()
    assert len(names) == 48 and names[1].startswith("video7013\tmissing")


def test_allow_missing_evaluates_the_rest_and_every_output_says_so(run_dir, media, tmp_path, capsys):
    msrvtt_1ka(tmp_path, media, listed=8, present=3)
    out = tmp_path / "results.json"
    assert main(["--run", str(run_dir), "--protocol", "msrvtt-1k-a", "--annotations", str(tmp_path),
                 "--media-root", str(tmp_path / "videos"), "--frames", "2", "--allow-missing",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    card = json.loads(out.read_text())
    data = card["data"]
    assert data["n_listed"] == 8 and data["n_evaluated"] == 3 and data["subset"] is True
    assert data["missing"]["count"] == 5 and data["missing"]["by_reason"] == {"missing": 5}
    assert data["missing"]["first"][0] == "video7013"
    missing_file = Path(data["missing"]["file"])
    assert missing_file == tmp_path / "results.missing.txt"
    assert [line.split("\t")[0] for line in missing_file.read_text().splitlines()[1:]] == [
        f"video{7010 + index}" for index in range(3, 8)]
    assert data["num_videos"] == 3 and card["num_queries"]["t2v"] == 3
    subset = "Evaluated on a subset. 3 of 8 listed videos evaluated (5 missing)"
    assert printed.startswith(f"WARNING (--allow-missing): {subset}") and printed.count("WARNING") == 2
    assert f"**{subset}" in out.with_suffix(".md").read_text()


def test_an_undecodable_video_stops_the_run_before_scoring(run_dir, media, tmp_path, capsys):
    msrvtt_1ka(tmp_path, media, listed=4, present=4)
    (tmp_path / "videos" / "video7011.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video" * 4)
    out = tmp_path / "results.json"
    arguments = ["--run", str(run_dir), "--protocol", "msrvtt-1k-a", "--annotations", str(tmp_path),
                 "--media-root", str(tmp_path / "videos"), "--frames", "2", "--out", str(out)]
    assert main(arguments) == 2
    captured = capsys.readouterr()
    error = last_line(captured.err)
    assert "1 of 4 videos of protocol msrvtt-1k-a" in error and "video_decode_error" in error
    assert "stopped before scoring (found while decoding): video7011" in error
    assert "R@1" not in captured.out and not out.exists()

    assert main([*arguments, "--allow-missing"]) == 0
    data = json.loads(out.read_text())["data"]
    assert data["n_evaluated"] == 3 and data["missing"]["by_reason"] == {"video_decode_error": 1}
    assert data["media"]["count"] == 3  # the fingerprint covers what was evaluated


def test_an_empty_file_is_unreadable_before_encoding(run_dir, media, tmp_path, capsys):
    msrvtt_1ka(tmp_path, media, listed=3, present=3)
    (tmp_path / "videos" / "video7012.mp4").write_bytes(b"")
    assert main(["--run", str(run_dir), "--protocol", "msrvtt-1k-a", "--annotations", str(tmp_path),
                 "--media-root", str(tmp_path / "videos"), "--out", str(tmp_path / "results.json")]) == 2
    error = capsys.readouterr().err
    assert "1 of 3 videos" in error and "(1 empty_file)" in error and "stopped before encoding: video7012" in error


def _tar_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def test_shards_that_lose_a_sample_are_refused(run_dir, media, tmp_path, capsys):
    shard = tmp_path / "val-000000.tar"
    with tarfile.open(shard, "w") as archive:
        for key in ("video0", "video1", "video2"):
            _tar_member(archive, f"{key}.mp4", (media / f"{key}.mp4").read_bytes())
            _tar_member(archive, f"{key}.txt", CAPTIONS[key][0].encode())
        _tar_member(archive, "broken.mp4", b"not a video at all")
        _tar_member(archive, "broken.txt", b"a caption")
    out = tmp_path / "results.json"
    arguments = ["--run", str(run_dir), "--data", str(shard), "--frames", "2", "--out", str(out)]
    assert main(arguments) == 2
    error = last_line(capsys.readouterr().err)
    assert "1 samples of" in error and "video_decode_error" in error and "--allow-missing" in error
    assert not out.exists()
    assert main([*arguments, "--allow-missing"]) == 0
    data = json.loads(out.read_text())["data"]
    assert (data["n_listed"], data["n_evaluated"], data["subset"]) == (4, 3, True)
    assert data["missing"]["by_reason"] == {"video_decode_error": 1}
