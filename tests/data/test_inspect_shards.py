"""``mmsphere inspect-shards``: every sample through the training decode path, reported as text or JSON."""

import json
import re

from mmsphere.cli import main as mmsphere_main
from mmsphere.data import skipped_counts


def mixed_shard(folder, media):
    members = [
        ("v14.txt", b"fourteen frames"), ("v14.mp4", media.video(frames=14, audio=True)),
        ("v9.json", json.dumps({"captions": ["nine", "frames"]}).encode()),
        ("v9.webm", media.video(frames=9, codec="libvpx", container_format="webm")),
        ("v3.txt", b"three frames"), ("v3.mp4", media.video(width=24, height=40, frames=3)),
        ("img.txt", b"an image"), ("img.jpg", media.image(30, 20, "JPEG")),
        ("bad.txt", b"zero bytes"), ("bad.mp4", b""),
        ("nocap.mp4", media.video(frames=4)),
        ("weights.pth", b"\x80\x04N."),
    ]
    return media.tar(folder / "mixed.tar", members)


def test_json_report_counts_everything(tmp_path, media, capsys):
    shard = mixed_shard(tmp_path, media)
    assert mmsphere_main(["inspect-shards", str(shard), "--frames", "8", "--size", "16", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["decoded"] == 4 and report["decoded_by_modality"] == {"image": 1, "video": 3}
    assert report["skipped"] == 3
    assert report["skipped_by_reason"] == {"empty_media": 1, "missing_caption": 1, "unknown_member": 1}
    frames = report["video_frames"]
    assert (frames["clips"], frames["min"], frames["median"], frames["max"]) == (3, 3, 9.0, 14)
    assert frames["shorter_than_requested"] == 1
    assert report["captions_per_sample"] == {"min": 1, "mean": 1.25, "max": 2}
    assert skipped_counts() == report["skipped_by_reason"]


def test_text_report_and_modality_filter(tmp_path, media, capsys):
    shard = mixed_shard(tmp_path, media)
    assert mmsphere_main(["inspect-shards", str(shard), "--modality", "image", "--size", "16"]) == 0
    printed = capsys.readouterr().out
    assert "decoded: 1 (image 1)" in printed
    assert "skipped: 6" in printed
    assert re.search(r"^\s+wrong_modality\s+4\s", printed, re.MULTILINE)  # the four videos


def test_bad_input_exit_codes(tmp_path, media, capsys):
    assert mmsphere_main(["inspect-shards", str(tmp_path / "absent-{0..1}.tar"), "--json"]) == 2
    assert "absent-0.tar" in capsys.readouterr().err
    empty = media.tar(tmp_path / "nothing.tar", [("a.txt", b"caption without media")])
    assert mmsphere_main(["inspect-shards", str(empty), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["skipped_by_reason"] == {"missing_media": 1}
