"""The embedded demo set: what its clips show matches what their captions say (checked on the decoded pixels)."""

import hashlib
import json
import re
import shutil

import numpy as np
import pytest

from mmsphere.data import build_eval_loader
from mmsphere.data.demo import DIGIT_WORDS, build_demo_data, encode_clip, main, rgb_to_yuv420p

SMALL = dict(num_train=20, num_train_images=10, num_meta=4, num_val=6, num_ood=20, mismatch_fraction=0.25)
DIRECTION_WORDS = ("left", "right", "up", "down")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, build_demo_data(out, seed=3, **SMALL)


def parse_caption(caption: str) -> tuple[int, tuple[str, ...]]:
    """(digit, directions in the order the caption names them)."""
    words = re.findall(r"[a-z0-9]+", caption.lower())
    digits = [int(word) if word.isdigit() else DIGIT_WORDS.index(word) for word in words
              if word.isdigit() or word in DIGIT_WORDS]
    assert len(digits) == 1, caption
    return digits[0], tuple(word for word in words if word in DIRECTION_WORDS)


def measured_motion(frames: np.ndarray) -> tuple[str, str]:
    """The two directions a bright blob travels: start -> turn -> end, from intensity centroids."""
    def centroid(frame):
        weight = frame.mean(axis=0)
        rows, columns = np.indices(weight.shape)
        return np.array([(rows * weight).sum(), (columns * weight).sum()]) / weight.sum()

    def direction(step):
        axis = int(np.argmax(np.abs(step)))
        return (("up", "down") if axis == 0 else ("left", "right"))[int(step[axis] > 0)]

    turn = (len(frames) - 1) // 2
    start, middle, end = (centroid(frames[index]) for index in (0, turn, len(frames) - 1))
    return direction(middle - start), direction(end - middle)


def decoded(meta, split, clip_frames):
    info = meta["splits"][split]
    loader = build_eval_loader(info["urls"], info["modality"], frames=clip_frames, image_size=meta["frame_size"],
                               image_mean=(0, 0, 0), image_std=(1, 1, 1), batch_size=16)
    return [(key, frames.numpy(), captions)
            for batch in loader for key, frames, captions in zip(batch.keys, batch.media, batch.captions)]


def test_meta_json_describes_every_split(demo):
    out, meta = demo
    assert json.loads((out / "meta.json").read_text()) == meta
    expected = {"train/video": 20, "train/image": 10, "meta": 4, "val": 6}
    assert {split: meta["splits"][split]["samples"] for split in expected} == expected
    assert meta["splits"]["ood/id"]["samples"] + meta["splits"]["ood/ood"]["samples"] == 20
    assert meta["id_class_names"] == ["zero", "one", "two", "three", "four", "five"]
    assert meta["ood_class_names"] == ["six", "seven", "eight", "nine"]
    assert len(meta["mismatched_keys"]) == round(0.25 * 20) + round(0.25 * 10)
    assert set(meta["mismatched_keys"]) == set(meta["mismatched_true_captions"])
    assert all(key.startswith(("train-video", "train-image")) for key in meta["mismatched_keys"])
    for split, info in meta["splits"].items():
        assert info["shards"] >= 2 or info["samples"] < 8, split


def test_clips_move_as_their_captions_say_unless_mismatched(demo):
    _, meta = demo
    mismatched = meta["mismatched_true_captions"]
    clips = decoded(meta, "train/video", meta["clip_frames"]) + decoded(meta, "meta", meta["clip_frames"])
    assert len(clips) == 24
    for key, frames, captions in clips:
        motion = measured_motion(frames)
        described = {parse_caption(caption) for caption in captions}
        assert len(described) == 1  # every caption of a clip tells the same story
        digit, directions = described.pop()
        if key in mismatched:
            true_digit, true_directions = parse_caption(mismatched[key])
            assert true_directions == motion
            assert (digit, directions) != (true_digit, true_directions)
        else:
            assert directions == motion, (key, captions)


def test_validation_clips_come_in_reversed_pairs(demo):
    _, meta = demo
    clips = decoded(meta, "val", meta["clip_frames"])
    assert len(clips) == 6
    for (_, frames_a, [caption_a]), (_, frames_b, [caption_b]) in zip(clips[::2], clips[1::2]):
        digit_a, directions_a = parse_caption(caption_a)
        digit_b, directions_b = parse_caption(caption_b)
        assert digit_a == digit_b and directions_b == directions_a[::-1] and directions_a[0] != directions_a[1]
        assert measured_motion(frames_a) == directions_a and measured_motion(frames_b) == directions_b


def test_image_splits_hold_their_classes(demo):
    _, meta = demo
    images = decoded(meta, "train/image", 1)
    assert len(images) == 10 and all(image.shape == (3, 32, 32) for _, image, _ in images)  # images [3, H, W]
    assert all(image.max() > 0.5 for _, image, _ in images)  # a bright digit on black
    for split, allowed in (("ood/id", range(0, 6)), ("ood/ood", range(6, 10))):
        for key, _, captions in decoded(meta, split, 1):
            assert meta["labels"][key] in allowed
            assert {parse_caption(caption)[0] for caption in captions} == {meta["labels"][key]}


def shard_digest(out) -> str:
    """One digest over every shard's path and bytes."""
    digest = hashlib.sha256()
    for path in sorted(out.rglob("*.tar")):
        digest.update(str(path.relative_to(out)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def test_same_seed_same_bytes_other_seed_other_data(tmp_path, demo):
    """Twenty builds with one seed, all in this process, give the same bytes; another seed, other data.

    Repeats in one process are what catch an encoder that reads uninitialised memory (x264's
    macroblock tree on AVX-512, see mmsphere.data.h264): a fresh process's heap starts zeroed, so
    its first build looks reproducible. Before the fix, the second or third build here differed.
    """
    out, meta = demo
    digests = {shard_digest(out)}
    for attempt in range(20):
        again = build_demo_data(tmp_path / "again", seed=3, **SMALL)
        assert again["mismatched_keys"] == meta["mismatched_keys"] and again["labels"] == meta["labels"]
        digests.add(shard_digest(tmp_path / "again"))
        shutil.rmtree(tmp_path / "again")
    assert len(digests) == 1, f"{len(digests)} different results from 21 builds with seed 3"
    other = build_demo_data(tmp_path / "other", seed=4, **SMALL)
    assert shard_digest(tmp_path / "other") not in digests
    shards = sorted(path.relative_to(out) for path in out.rglob("*.tar"))
    assert all((out / path).read_bytes() != (tmp_path / "other" / path).read_bytes() for path in shards)
    assert other["mismatched_keys"] != meta["mismatched_keys"]


def test_bad_arguments_and_existing_output(tmp_path, demo, capsys):
    with pytest.raises(ValueError, match="mismatch_fraction=1.0"):
        build_demo_data(tmp_path / "a", mismatch_fraction=1.0)
    with pytest.raises(ValueError, match="num_val=5"):
        build_demo_data(tmp_path / "b", num_val=5)
    with pytest.raises(FileExistsError, match="overwrite"):
        build_demo_data(demo[0], **SMALL)
    assert main(["--out", str(demo[0])]) == 2
    assert "already holds demo data" in capsys.readouterr().err


def test_clip_encoding_gives_the_same_bytes_every_time(tmp_path):
    """Five encodings of one clip are identical, and the file holds no library version or clock."""
    rng = np.random.default_rng(5)
    frames = np.zeros((8, 16, 16, 3), dtype=np.uint8)
    for index in range(8):  # a bright square moving right, like a demo digit
        frames[index, 3:11, index:index + 8] = rng.integers(60, 256, size=(8, 8, 1))
    encoded = []
    for attempt in range(5):
        # a fresh copy each time, so no two encodings share a source buffer
        encode_clip(frames.copy(), tmp_path / f"{attempt}.mp4")
        encoded.append((tmp_path / f"{attempt}.mp4").read_bytes())
    assert all(data == encoded[0] for data in encoded[1:])
    # bit-exact muxer and codec: no "Lavf…"/"Lavc…" version tags (nor a creation time) in the container
    assert b"Lavf" not in encoded[0] and b"Lavc" not in encoded[0]
    # x264 records its own settings in the stream: one thread, no lookahead or sliced threads, and
    # no macroblock tree (whose AVX-512 kernels read uninitialised memory on frames this small)
    assert b"threads=1 lookahead_threads=1 sliced_threads=0" in encoded[0] and b"mbtree=0" in encoded[0]


def test_colour_conversion_is_bt601_limited_range():
    """The encoder's input planes against the BT.601 matrix in floating point (2x2 block means for chroma)."""
    frame = np.random.default_rng(6).integers(0, 256, size=(6, 10, 3), dtype=np.uint8)
    planes = rgb_to_yuv420p(frame)
    assert planes.shape == (9, 10) and planes.dtype == np.uint8
    flat = planes.ravel().astype(float)
    luma, chroma_b, chroma_r = flat[:60].reshape(6, 10), flat[60:75].reshape(3, 5), flat[75:].reshape(3, 5)
    red, green, blue = (frame[..., channel].astype(float) for channel in range(3))
    assert np.abs(luma - (16 + (65.481 * red + 128.553 * green + 24.966 * blue) / 255)).max() <= 1
    block = frame.astype(float).reshape(3, 2, 5, 2, 3).mean(axis=(1, 3))
    red, green, blue = block[..., 0], block[..., 1], block[..., 2]
    assert np.abs(chroma_b - (128 + (-37.797 * red - 74.203 * green + 112.0 * blue) / 255)).max() <= 1
    assert np.abs(chroma_r - (128 + (112.0 * red - 93.786 * green - 18.214 * blue) / 255)).max() <= 1
    for value, luma in ((0, 16), (128, 126), (255, 235)):  # grays: the demo's digits on black
        assert rgb_to_yuv420p(np.full((2, 2, 3), value, dtype=np.uint8)).ravel().tolist() == [luma] * 4 + [128, 128]
