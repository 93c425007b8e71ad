"""Corrupt and hostile shards, each built on the fly: skipped or handled, counted, warned about, never fatal."""

import io
import logging
import pickle
import tarfile
import time
from pathlib import Path

import pytest
import torch

from mmsphere.data.config import DataConfig, SourceConfig
from mmsphere.data import build_eval_loader, build_train_stream, skipped_counts


class CreatesFileWhenUnpickled:
    """Unpickling this calls ``Path.touch(path)``: the stand-in for any code an attacker would run."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


@pytest.fixture(autouse=True)
def no_sleeping(monkeypatch):
    def refuse(seconds):
        raise AssertionError(f"the data pipeline slept for {seconds} s")

    monkeypatch.setattr(time, "sleep", refuse)


def good(key: str, clip: bytes, caption: str = "a clip") -> list[tuple[str, bytes]]:
    return [(f"{key}.txt", caption.encode()), (f"{key}.mp4", clip)]


def read_all(urls, media, modality="video", frames=8):
    """Every batch of a single pass (the evaluation loader: same reader and decode path as training)."""
    loader = build_eval_loader(
        urls, modality, frames=frames, image_size=16, image_mean=media.mean, image_std=media.std, batch_size=2
    )
    return list(loader)


def keys_of(batches):
    return [key for batch in batches for key in batch.keys]


def assert_warned(caplog, reason):
    assert any(reason in record.getMessage() for record in caplog.records), f"no warning about {reason}"


@pytest.mark.parametrize("cut", ["inside_member_data", "at_header_boundary", "inside_header"])
def test_truncated_tar_keeps_what_precedes_the_cut_and_reads_the_next_shard(tmp_path, media, clip_bytes, caplog, cut):
    first = media.tar(tmp_path / "a-0.tar", good("k0", clip_bytes) + good("k1", clip_bytes) + good("k2", clip_bytes))
    media.tar(tmp_path / "a-1.tar", good("k3", clip_bytes))
    with tarfile.open(first) as archive:
        k2_txt, k2_mp4 = archive.getmember("k2.txt"), archive.getmember("k2.mp4")
    position = {
        "inside_member_data": k2_mp4.offset_data + 100,
        "at_header_boundary": k2_txt.offset,
        "inside_header": k2_txt.offset + 100,
    }[cut]
    first.write_bytes(first.read_bytes()[:position])
    with caplog.at_level(logging.WARNING):
        batches = read_all(str(tmp_path / "a-{0..1}.tar"), media)
    assert keys_of(batches) == ["k0", "k1", "k3"]
    expected = {"truncated_tar": 1}
    if cut == "inside_member_data":
        expected["missing_media"] = 1  # k2.txt arrived whole, k2.mp4 did not
    assert skipped_counts() == expected
    assert_warned(caplog, "truncated_tar")


def test_a_file_that_is_not_a_tar_is_counted(tmp_path, media, clip_bytes):
    (tmp_path / "a-0.tar").write_bytes(b"this is not a tar archive" * 100)
    media.tar(tmp_path / "a-1.tar", good("k0", clip_bytes))
    assert keys_of(read_all(str(tmp_path / "a-{0..1}.tar"), media)) == ["k0"]
    assert skipped_counts() == {"truncated_tar": 1}


@pytest.mark.parametrize(
    "modality,extension,payload,reason",
    [
        ("video", "mp4", b"", "empty_media"),
        ("video", "mp4", bytes(range(256)) * 40, "video_decode_error"),
        ("image", "jpg", b"", "empty_media"),
        ("image", "jpg", b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4, "image_decode_error"),
    ],
    ids=["zero_byte_mp4", "garbage_mp4", "zero_byte_jpg", "garbage_jpg"],
)
def test_zero_byte_and_garbage_media_are_skipped(tmp_path, media, clip_bytes, caplog, modality, extension, payload,
                                                  reason):
    valid = clip_bytes if modality == "video" else media.image(20, 20, "JPEG")
    members = [("a.txt", b"ok"), (f"a.{extension}", valid), ("bad.txt", b"bad"), (f"bad.{extension}", payload),
               ("b.txt", b"ok"), (f"b.{extension}", valid)]
    with caplog.at_level(logging.WARNING):
        batches = read_all(str(media.tar(tmp_path / "s.tar", members)), media, modality)
    assert keys_of(batches) == ["a", "b"]
    assert skipped_counts() == {reason: 1}
    assert_warned(caplog, reason)


def test_video_shorter_than_t_is_kept_and_masked(tmp_path, media, clip_bytes):
    short = media.video(frames=3)
    shard = media.tar(tmp_path / "s.tar", good("long", clip_bytes) + good("short", short))
    batches = read_all(str(shard), media, frames=8)
    assert keys_of(batches) == ["long", "short"] and skipped_counts() == {}
    masks = batches[0].frame_mask
    assert masks[0].tolist() == [True] * 8
    assert masks[1].tolist() == [True] * 3 + [False] * 5
    assert (batches[0].media[1, 3:] == 0).all() and (batches[0].media[1, :3] != 0).any()


def test_mp4_with_only_an_audio_stream_is_skipped(tmp_path, media, clip_bytes, caplog):
    audio_only = media.video(video=False, audio=True)
    shard = media.tar(tmp_path / "s.tar", good("a", clip_bytes) + good("sound", audio_only) + good("b", clip_bytes))
    with caplog.at_level(logging.WARNING):
        assert keys_of(read_all(str(shard), media)) == ["a", "b"]
    assert skipped_counts() == {"no_video_stream": 1}
    assert_warned(caplog, "no_video_stream")


@pytest.mark.parametrize(
    "caption_member,reason",
    [(None, "missing_caption"), (("txt", b""), "empty_caption"), (("txt", b"  \n "), "empty_caption"),
     (("txt", b"\xff\xfe non-UTF-8 \xe9"), "caption_not_utf8")],
    ids=["missing", "empty", "whitespace", "non_utf8"],
)
def test_missing_empty_or_non_utf8_caption_is_skipped(tmp_path, media, clip_bytes, caplog, caption_member, reason):
    hostile = [("x.mp4", clip_bytes)] + ([(f"x.{caption_member[0]}", caption_member[1])] if caption_member else [])
    shard = media.tar(tmp_path / "s.tar", good("a", clip_bytes) + hostile + good("b", clip_bytes))
    with caplog.at_level(logging.WARNING):
        assert keys_of(read_all(str(shard), media)) == ["a", "b"]
    assert skipped_counts() == {reason: 1}
    assert_warned(caplog, reason)


def test_duplicated_keys_keep_the_first_sample(tmp_path, media, clip_bytes, caplog):
    members = (
        good("a", clip_bytes, "first a")
        + good("a", clip_bytes, "second a, right after")
        + good("b", clip_bytes, "b")
        + good("a", clip_bytes, "third a, later in the shard")
    )
    with caplog.at_level(logging.WARNING):
        batches = read_all(str(media.tar(tmp_path / "s.tar", members)), media)
    assert keys_of(batches) == ["a", "b"]
    assert batches[0].captions == [["first a"], ["b"]]
    assert skipped_counts() == {"duplicate_key": 2}
    assert_warned(caplog, "duplicate_key")


def test_decompression_bomb_image_is_skipped(tmp_path, media, caplog):
    members = [("a.txt", b"ok"), ("a.png", media.image(20, 20)), ("bomb.txt", b"boom"),
               ("bomb.png", media.png_bomb(8000)), ("b.txt", b"ok"), ("b.png", media.image(20, 20))]
    with caplog.at_level(logging.WARNING):
        assert keys_of(read_all(str(media.tar(tmp_path / "s.tar", members)), media, "image")) == ["a", "b"]
    assert skipped_counts() == {"image_too_large": 1}
    assert_warned(caplog, "image_too_large")


def test_pickled_members_are_never_unpickled(tmp_path, media, clip_bytes, caplog):
    marker = tmp_path / "payload-ran"
    payload = pickle.dumps(CreatesFileWhenUnpickled(marker))
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(CreatesFileWhenUnpickled(probe)))
    assert probe.exists()  # the payload is real: unpickling it does create the file
    torch_payload = io.BytesIO()
    torch.save({"weights": CreatesFileWhenUnpickled(marker)}, torch_payload)
    members = good("a", clip_bytes) + [
        ("a.pth", torch_payload.getvalue()),
        ("evil.pickle", payload),
        ("evil.pyd", payload),
        ("b.txt", b"ok"),
        ("b.mp4", clip_bytes),
        ("b.pickle", payload),
    ]
    with caplog.at_level(logging.WARNING):
        batches = read_all(str(media.tar(tmp_path / "s.tar", members)), media)
    assert keys_of(batches) == ["a", "b"]
    assert not marker.exists()
    assert skipped_counts() == {"unknown_member": 4}
    assert_warned(caplog, "unknown_member")


def test_links_in_a_shard_are_not_followed(tmp_path, media, clip_bytes):
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as archive:
        for name, data in good("a", clip_bytes):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("b.mp4")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        archive.addfile(link)
        info = tarfile.TarInfo("b.txt")
        info.size = 2
        archive.addfile(info, io.BytesIO(b"ok"))
    assert keys_of(read_all(str(shard), media)) == ["a"]
    assert skipped_counts() == {"non_regular_member": 1, "missing_media": 1}


def test_training_stream_survives_a_hostile_shard(tmp_path, media, clip_bytes, tokenizer):
    """All of the above in one shard, through the training stream: it keeps producing full batches."""
    members = (
        good("a", clip_bytes) + [("z.mp4", b"")] + [("z.txt", b"zero")] + good("b", media.video(frames=2))
        + [("c.mp4", clip_bytes), ("c.txt", b"\xff\xfe")] + [("p.pickle", b"\x80\x04K\x01.")] + good("d", clip_bytes)
    )
    shards = [media.tar(tmp_path / f"s-{index}.tar", members) for index in range(2)]
    (tmp_path / "s-1.tar").write_bytes(shards[1].read_bytes()[:-3000])  # and truncate one
    data = DataConfig(frames=4, resampled=True, shuffle_buffer=4, epoch_samples=24)
    source = SourceConfig(urls=str(tmp_path / "s-{0..1}.tar"), modality="video", name="hostile")
    stream = build_train_stream([source], data, image_size=16, image_mean=media.mean, image_std=media.std,
                                tokenizer=tokenizer, batch_size=4, seed=1)
    batches = list(stream)
    assert len(batches) == 6 and all(len(batch.keys) == 4 for batch in batches)
    assert {key for batch in batches for key in batch.keys} <= {"a", "b", "d"}
    counts = skipped_counts()
    assert counts["empty_media"] >= 1 and counts["caption_not_utf8"] >= 1 and counts["unknown_member"] >= 1
    assert sum(sum(batch.skipped.values()) for batch in batches) <= sum(counts.values())


def test_pipe_urls_stream_shards_and_failed_commands_are_counted(tmp_path, media, clip_bytes):
    shard = media.tar(tmp_path / "s.tar", good("a", clip_bytes) + good("b", clip_bytes))
    urls = f"pipe:cat {shard}::pipe:cat {tmp_path / 'absent.tar'}::pipe:exit 3::{shard}"
    batches = read_all(urls, media)
    assert keys_of(batches) == ["a", "b", "a", "b"]
    assert skipped_counts() == {"shard_open_error": 2}


def test_empty_shard_file_is_counted(tmp_path, media, clip_bytes):
    (tmp_path / "s-0.tar").write_bytes(b"")
    media.tar(tmp_path / "s-1.tar", good("a", clip_bytes))
    assert keys_of(read_all(str(tmp_path / "s-{0..1}.tar"), media)) == ["a"]
    assert skipped_counts() == {"truncated_tar": 1}
