"""The shard builder (``mmsphere make-shards``): lists in, standard webdataset shards out, bad inputs summarised."""

import io
import json
import re
import tarfile

import av
import torch
import pytest
import webdataset as wds

from mmsphere.cli import main as mmsphere_main
from mmsphere.config import MmsphereError
from mmsphere.data.sample_list import read_sample_list
from mmsphere.data.shards import make_shards


def read_with_webdataset(pattern: str) -> dict[str, dict]:
    """Samples as webdataset itself reads them: key -> {extension: bytes}."""
    dataset = wds.WebDataset(pattern, shardshuffle=False, empty_check=False)
    return {sample["__key__"]: {k: v for k, v in sample.items() if not k.startswith("__")} for sample in dataset}


@pytest.fixture()
def media_folder(tmp_path, media):
    folder = tmp_path / "media"
    folder.mkdir()
    (folder / "clip.mp4").write_bytes(media.video(frames=10, audio=True))
    (folder / "portrait.webm").write_bytes(media.video(width=24, height=40, frames=6, codec="libvpx",
                                                       container_format="webm"))
    (folder / "photo.jpg").write_bytes(media.image(30, 20, "JPEG"))
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "garbage.png").write_bytes(b"not a png at all")
    (folder / "sound.mp4").write_bytes(media.video(video=False, audio=True))
    (folder / "notes.pdf").write_bytes(b"%PDF-1.4")
    return folder


def test_jsonl_list_becomes_shards_and_a_summary(tmp_path, media_folder, capsys):
    rows = [
        {"path": "media/clip.mp4", "caption": "a clip with sound"},
        {"video": str(media_folder / "portrait.webm"), "captions": ["tall", "narrow"], "key": "tall.one"},
        {"image": "media/photo.jpg", "caption": "a photo", "key": "photo"},
        {"path": "media/missing.mp4", "caption": "gone"},
        {"path": "media/notes.pdf", "caption": "a document"},
        {"path": "media/empty.mp4", "caption": "nothing"},
        {"path": "media/garbage.png", "caption": "junk"},
        {"path": "media/sound.mp4", "caption": "audio only"},
        {"path": "media/clip.mp4", "caption": "   "},
        {"path": "media/photo.jpg", "caption": "same key again", "key": "photo"},
    ]
    listing = tmp_path / "list.jsonl"
    listing.write_text("\n".join(json.dumps(row) for row in rows) + "\n{not json\n")
    out = tmp_path / "shards"
    code = mmsphere_main(["make-shards", "--input", str(listing), "--out", str(out), "--maxcount", "2", "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0
    assert sorted(path.name for path in out.iterdir()) == ["shard-000000.tar", "shard-000001.tar", "sizes.json"]
    assert json.loads((out / "sizes.json").read_text()) == {"shard-000000.tar": 2, "shard-000001.tar": 1}
    samples = read_with_webdataset(str(out / "shard-{000000..000001}.tar"))
    assert set(samples) == {"clip", "tall_one", "photo"}
    assert samples["clip"]["mp4"] == (media_folder / "clip.mp4").read_bytes()  # the original bytes
    assert samples["clip"]["txt"] == b"a clip with sound"
    assert samples["tall_one"]["webm"] == (media_folder / "portrait.webm").read_bytes()
    assert json.loads(samples["tall_one"]["json"]) == {"captions": ["tall", "narrow"]}
    assert samples["photo"]["jpg"] == (media_folder / "photo.jpg").read_bytes()
    expected = {"missing": 1, "unsupported_extension": 1, "unreadable": 3, "no_caption": 1, "duplicate_key": 1,
                "bad_line": 1}
    assert "skipped 8 input(s)" in printed
    for reason, count in expected.items():
        assert re.search(rf"^\s+{reason}\s+{count}\s+\(", printed, re.MULTILINE), reason


def test_existing_shards_are_not_overwritten_without_the_flag(tmp_path, media_folder, capsys):
    listing = tmp_path / "list.jsonl"
    listing.write_text(json.dumps({"path": "media/photo.jpg", "caption": "a photo"}) + "\n")
    out = tmp_path / "shards"
    arguments = ["make-shards", "--input", str(listing), "--out", str(out), "--quiet"]
    assert mmsphere_main(arguments) == 0
    before = (out / "shard-000000.tar").read_bytes()
    capsys.readouterr()
    assert mmsphere_main(arguments) == 2
    assert "--overwrite" in capsys.readouterr().err
    (out / "shard-000007.tar").write_bytes(b"stale")
    assert mmsphere_main(arguments + ["--overwrite"]) == 0
    assert not (out / "shard-000007.tar").exists()
    assert (out / "shard-000000.tar").read_bytes() == before  # deterministic: same list, same bytes


def test_maxsize_starts_a_new_shard(tmp_path, media_folder):
    listing = tmp_path / "list.jsonl"
    listing.write_text("".join(json.dumps({"path": "media/clip.mp4", "caption": "c", "key": f"k{i}"}) + "\n"
                               for i in range(3)))
    one_sample = (media_folder / "clip.mp4").stat().st_size + 3 * 512
    summary = make_shards(listing, tmp_path / "out", maxsize=one_sample + 1024, progress=False)
    assert summary.samples[""] == 3 and len(summary.shards[""]) == 3
    for path in summary.shards[""]:
        assert path.stat().st_size <= one_sample + 1024 + 10240  # + the tar end blocks and record padding


def test_csv_with_semicolons_splits_and_relative_paths(tmp_path, media_folder):
    listing = tmp_path / "list.csv"
    listing.write_text(
        'path;caption;captions;split\n'
        'media/clip.mp4;one caption;;train\n'
        'media/photo.jpg;;"[""first"", ""second""]";val\n'
        'media/portrait.webm;tall;;train\n'
    )
    summary = make_shards(listing, tmp_path / "out", progress=False)
    assert summary.samples == {"train": 2, "val": 1} and not summary.skipped
    assert set(read_with_webdataset(summary.url_pattern("train"))) == {"clip", "portrait"}
    photo = read_with_webdataset(summary.url_pattern("val"))["photo"]
    assert json.loads(photo["json"]) == {"captions": ["first", "second"]}


@pytest.mark.parametrize("delimiter", [",", ";"])
def test_msrvtt_1k_a_csv_with_media_root(tmp_path, media, delimiter):
    videos = tmp_path / "MSRVTT" / "videos" / "all"
    videos.mkdir(parents=True)
    for number in (7020, 7021):
        (videos / f"video{number}.mp4").write_bytes(media.video(frames=6))
    listing = tmp_path / "MSRVTT_JSFUSION_test.csv"
    rows = [("ret0", "msr7020", "video7020", "a family is having a conversation, at home"),
            ("ret1", "msr7021", "video7021", "a man plays a guitar"),
            ("ret2", "msr9999", "video9999", "this video is not in the folder")]
    quote = '"' if delimiter == "," else ""
    listing.write_text(delimiter.join(["key", "vid_key", "video_id", "sentence"]) + "\n" + "".join(
        delimiter.join(row[:3]) + delimiter + quote + row[3] + quote + "\n" for row in rows))
    with pytest.raises(MmsphereError, match="MSR-VTT list .* pass --media-root"):
        read_sample_list(listing)
    summary = make_shards(listing, tmp_path / "out", media_root=videos, progress=False)
    samples = read_with_webdataset(summary.url_pattern())
    assert samples["video7020"]["txt"].decode() == "a family is having a conversation, at home"
    assert samples["video7021"]["mp4"] == (videos / "video7021.mp4").read_bytes()
    assert summary.skipped_by_reason() == {"missing": 1}


def test_msrvtt_rows_of_one_video_become_one_sample(tmp_path, media):
    (tmp_path / "video1.mp4").write_bytes(media.video(frames=4))
    listing = tmp_path / "list.csv"
    listing.write_text("video_id,sentence\nvideo1,first caption\nvideo1,second caption\n")
    entries, skipped = read_sample_list(listing, media_root=tmp_path)
    assert not skipped and len(entries) == 1 and entries[0].captions == ["first caption", "second caption"]


def test_unusable_lists_fail_with_a_clear_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        read_sample_list(tmp_path / "nowhere.jsonl")
    (tmp_path / "list.txt").write_text("a\n")
    with pytest.raises(MmsphereError, match="unknown format '.txt'"):
        read_sample_list(tmp_path / "list.txt")
    (tmp_path / "list.csv").write_text("filename,text\na.mp4,hello\n")
    with pytest.raises(MmsphereError, match="no media column.*found: filename, text"):
        read_sample_list(tmp_path / "list.csv")


def test_videos_are_reencoded_down_to_the_limits(tmp_path, media):
    (tmp_path / "big.mp4").write_bytes(media.video(width=64, height=48, frames=20, fps=20))
    (tmp_path / "small.mp4").write_bytes(media.video(width=32, height=24, frames=5, fps=5))
    listing = tmp_path / "list.jsonl"
    listing.write_text(json.dumps({"path": "big.mp4", "caption": "big"}) + "\n"
                       + json.dumps({"path": "small.mp4", "caption": "small"}) + "\n")
    summary = make_shards(listing, tmp_path / "out", max_side=32, max_fps=10, progress=False)
    samples = read_with_webdataset(summary.url_pattern())
    assert samples["small"]["mp4"] == (tmp_path / "small.mp4").read_bytes()  # within limits: untouched
    with av.open(io.BytesIO(samples["big"]["mp4"])) as container:
        stream = container.streams.video[0]
        frames = list(container.decode(stream))
        assert (stream.codec_context.width, stream.codec_context.height) == (32, 24)
        assert stream.average_rate == 10
    assert len(frames) == 10  # 2 s at 20 fps -> 2 s at 10 fps
    with tarfile.open(summary.shards[""][0]) as archive:
        assert all(member.mtime == 0 and member.uname == "" for member in archive.getmembers())


def test_a_group_column_travels_into_the_sample_json_and_the_batches(tmp_path, media_folder, media):
    rows = [{"path": "media/photo.jpg", "caption": "a photo of a cat", "group": "cat", "key": "one"},
            {"path": "media/photo.jpg", "caption": "a photo of a cat", "group": "cat", "key": "two"},
            {"path": "media/photo.jpg", "caption": "a photo of a dog", "key": "three"}]
    listing = tmp_path / "list.jsonl"
    listing.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    summary = make_shards(listing, tmp_path / "out", progress=False)
    samples = read_with_webdataset(summary.url_pattern())
    assert json.loads(samples["one"]["json"]) == {"captions": ["a photo of a cat"], "group": "cat"}
    assert samples["three"]["txt"] == b"a photo of a dog"  # no group: the plain caption file, as before

    from mmsphere.data.config import DataConfig, SourceConfig
    from mmsphere.data import build_train_stream

    stream = build_train_stream([SourceConfig(urls=summary.url_pattern(), modality="image")],
                                DataConfig(frames=1, shuffle_buffer=0, epoch_samples=3, resampled=False),
                                image_size=16, image_mean=media.mean, image_std=media.std,
                                tokenizer=lambda captions: torch.zeros(len(captions), 4, dtype=torch.long),
                                batch_size=3)
    batch = next(iter(stream))
    assert dict(zip(batch.keys, batch.groups)) == {"one": "cat", "two": "cat", "three": "three"}
