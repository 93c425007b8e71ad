"""The embedded demo set: real handwritten digits (scikit-learn's bundled copy) moving on a small canvas.

Offline and deterministic. Video-text clips show one digit moving in two named directions in turn
("a 7 moves left then up"), so both the motion and its order matter; the validation split holds
pairs of clips of the same digit image with the two motions in opposite order. Image-text pairs
("a handwritten 3"), a clean meta set, a fraction of deliberately mismatched training captions and
in-distribution (digits 0-5) / out-of-distribution (digits 6-9) image splits complete it. Every
split is written through the shard builder (:func:`mmsphere.data.shards.make_shards`); the output
folder gets a ``meta.json`` describing it.

    python -m mmsphere.data.demo --out runs/demo/data
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from tqdm import tqdm

from mmsphere.data.h264 import x264_options
from mmsphere.data.shards import make_shards

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
# (rows, columns) step of each direction in image coordinates
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ID_DIGITS = (0, 1, 2, 3, 4, 5)
OOD_DIGITS = (6, 7, 8, 9)
CLASS_PROMPT = "a handwritten {}"
VIDEO_TEMPLATES = (
    "a {numeral} moves {first} then {second}",
    "the digit {word} moves {first} and then {second}",
    "a handwritten {word} goes {first}, then {second}",
    "{word} moving {first}, then {second}",
)
IMAGE_TEMPLATES = ("a handwritten {numeral}", "the digit {word}", "a handwritten {word}", "the number {numeral}")
FPS = 8


@dataclass(frozen=True)
class Motion:
    """What a clip shows: a digit moving ``first``, then ``second``."""

    digit: int
    first: str
    second: str

    def caption(self, template: str) -> str:
        return template.format(numeral=self.digit, word=DIGIT_WORDS[self.digit], first=self.first, second=self.second)


def build_demo_data(
    out_dir: str | Path,
    *,
    seed: int = 0,
    mismatch_fraction: float = 0.2,
    num_train: int = 1200,
    num_train_images: int = 600,
    num_meta: int = 200,
    num_val: int = 200,
    num_ood: int = 300,
    clip_frames: int = 12,
    frame_size: int = 32,
    digit_size: int = 14,
    overwrite: bool = False,
    progress: bool = False,
) -> dict:
    """Write the demo shards into ``out_dir`` and return the ``meta.json`` dict (also written there).

    Splits: ``train/video`` (clips, ``mismatch_fraction`` of them with a wrong caption),
    ``train/image`` (image-text pairs, same fraction mismatched), ``meta`` (clean clips),
    ``val`` (clean clips in reversed-motion pairs), ``ood/id`` and ``ood/ood`` (images of digits
    0-5 and 6-9). ``meta.json`` lists the shard URL pattern of each split, the mismatched keys
    (and their true captions), the ID and OoD class names and the labels of the OoD-split images.
    """
    _check_arguments(mismatch_fraction, num_train, num_train_images, num_meta, num_val, num_ood, clip_frames,
                     frame_size, digit_size)
    started = time.perf_counter()
    out_dir = Path(out_dir)
    if (out_dir / "meta.json").exists() and not overwrite:
        raise FileExistsError(f"{str(out_dir)!r} already holds demo data (meta.json); pass overwrite=True")
    rng = np.random.default_rng(seed)
    digits = load_digits()
    glyphs = [_glyph(image, digit_size) for image in digits.images]
    labels = [int(label) for label in digits.target]
    pools = _split_pools(len(glyphs), rng)
    renderer = _Renderer(glyphs, labels, frame_size, digit_size, clip_frames)

    mismatched: dict[str, str] = {}
    splits: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="mmsphere-demo-") as staging_dir:
        staging = Path(staging_dir)
        bar = tqdm(total=num_train + num_train_images + num_meta + num_val + num_ood, desc="demo data",
                   unit="sample", disable=not progress)
        splits["train/video"] = _video_split(
            "train-video", num_train, pools["train"], renderer, rng, staging, bar, mismatch_fraction, mismatched
        )
        splits["train/image"] = _image_split(
            "train-image", num_train_images, pools["train"], renderer, rng, staging, bar, mismatch_fraction, mismatched
        )
        splits["meta"] = _video_split("meta", num_meta, pools["meta"], renderer, rng, staging, bar)
        splits["val"] = _reversed_pairs("val", num_val, pools["val"], renderer, rng, staging, bar)
        id_pool = [index for index in pools["ood"] if labels[index] in ID_DIGITS]
        ood_pool = [index for index in pools["ood"] if labels[index] in OOD_DIGITS]
        num_id = round(num_ood * len(id_pool) / (len(id_pool) + len(ood_pool)))
        splits["ood/id"] = _image_split("ood-id", num_id, id_pool, renderer, rng, staging, bar, without_repeats=True)
        splits["ood/ood"] = _image_split(
            "ood-ood", num_ood - num_id, ood_pool, renderer, rng, staging, bar, without_repeats=True
        )
        bar.close()

        meta_splits = {}
        for split, rows in splits.items():
            list_path = staging / f"{split.replace('/', '-')}.jsonl"
            list_path.write_text("".join(json.dumps(row["list"]) + "\n" for row in rows))
            maxcount = max(1, min(100, -(-len(rows) // 4)))  # at least 4 shards: 2 processes x 2 workers
            summary = make_shards(list_path, out_dir / split, maxcount=maxcount, overwrite=overwrite, progress=False)
            if summary.skipped:
                raise RuntimeError(f"demo split {split}: the shard builder skipped {summary.skipped_by_reason()}")
            meta_splits[split] = {
                "urls": summary.url_pattern(),
                "modality": "image" if split.startswith(("train/image", "ood/")) else "video",
                "samples": summary.samples[""],
                "shards": len(summary.shards[""]),
            }

    meta = {
        "format_version": FORMAT_VERSION,
        "name": "mmsphere-demo-digits",
        "seed": seed,
        "mismatch_fraction": mismatch_fraction,
        "clip_frames": clip_frames,
        "frame_size": frame_size,
        "fps": FPS,
        "splits": meta_splits,
        "mismatched_keys": sorted(mismatched),
        "mismatched_true_captions": dict(sorted(mismatched.items())),
        "id_class_names": [DIGIT_WORDS[digit] for digit in ID_DIGITS],
        "ood_class_names": [DIGIT_WORDS[digit] for digit in OOD_DIGITS],
        "id_labels": list(ID_DIGITS),
        "ood_labels": list(OOD_DIGITS),
        "class_prompt": CLASS_PROMPT,
        "directions": list(DIRECTIONS),
        "labels": {row["list"]["key"]: row["label"] for split in ("ood/id", "ood/ood") for row in splits[split]},
    }
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    logger.info("demo data in %s built in %.1f s", out_dir, time.perf_counter() - started)
    return meta


def _check_arguments(mismatch_fraction: float, *counts_and_sizes: int) -> None:
    if not 0 <= mismatch_fraction < 1:
        raise ValueError(f"mismatch_fraction={mismatch_fraction} must be in [0, 1)")
    names = ("num_train", "num_train_images", "num_meta", "num_val", "num_ood", "clip_frames", "frame_size",
             "digit_size")
    values = dict(zip(names, counts_and_sizes))
    for name in ("num_train", "num_train_images", "num_meta", "num_ood"):
        if values[name] < 2:
            raise ValueError(f"{name}={values[name]} must be >= 2")
    if values["num_val"] < 2 or values["num_val"] % 2:
        raise ValueError(f"num_val={values['num_val']} must be an even number >= 2 (clips come in reversed pairs)")
    if values["clip_frames"] < 4:
        raise ValueError(f"clip_frames={values['clip_frames']} must be >= 4 (two motion segments)")
    if values["frame_size"] % 2 or values["frame_size"] < 16:
        raise ValueError(f"frame_size={values['frame_size']} must be even and >= 16 (H.264 4:2:0)")
    if not 4 <= values["digit_size"] <= values["frame_size"] - 4:
        raise ValueError(f"digit_size={values['digit_size']} must be in [4, frame_size - 4]")


def _glyph(image: np.ndarray, size: int) -> np.ndarray:
    """An 8x8 digit (values 0-16) as a ``size`` x ``size`` uint8 intensity map."""
    pixels = Image.fromarray((image * (255.0 / 16.0)).astype(np.uint8))
    return np.asarray(pixels.resize((size, size), Image.BICUBIC))


def _split_pools(count: int, rng: np.random.Generator) -> dict[str, list[int]]:
    """Disjoint digit images for each split, so that evaluation never sees a training glyph."""
    order = rng.permutation(count)
    bounds = np.cumsum([int(count * share) for share in (0.5, 0.1, 0.15)])
    return {
        "train": order[: bounds[0]].tolist(),
        "meta": order[bounds[0] : bounds[1]].tolist(),
        "val": order[bounds[1] : bounds[2]].tolist(),
        "ood": order[bounds[2] :].tolist(),
    }


class _Renderer:
    """Draws digits on a black canvas, still or moving, and encodes clips as H.264."""

    def __init__(self, glyphs: list[np.ndarray], labels: list[int], frame_size: int, digit_size: int, clip_frames: int):
        self.glyphs = glyphs
        self.labels = labels
        self.frame_size = frame_size
        self.digit_size = digit_size
        self.clip_frames = clip_frames
        self.room = frame_size - digit_size
        # each segment travels half the free room, so any two segments fit on the canvas
        self.segment = self.room / 2

    def path(self, motion: Motion, rng: np.random.Generator) -> np.ndarray:
        """Top-left corner of the digit in each frame, ``[F, 2]`` (rows, columns)."""
        turn = (self.clip_frames - 1) // 2
        first = np.array(DIRECTIONS[motion.first], dtype=float)
        second = np.array(DIRECTIONS[motion.second], dtype=float)
        offsets = []
        for frame in range(self.clip_frames):
            along_first = min(frame, turn) / turn
            along_second = max(0, frame - turn) / (self.clip_frames - 1 - turn)
            offsets.append(self.segment * (first * along_first + second * along_second))
        offsets = np.array(offsets)
        low, high = -offsets.min(axis=0), self.room - offsets.max(axis=0)
        start = rng.uniform(low, high)
        return np.rint(start + offsets).astype(int)

    def frame(self, glyph_index: int, corner: tuple[int, int]) -> np.ndarray:
        canvas = np.zeros((self.frame_size, self.frame_size), dtype=np.uint8)
        row, column = corner
        canvas[row : row + self.digit_size, column : column + self.digit_size] = self.glyphs[glyph_index]
        return np.repeat(canvas[:, :, None], 3, axis=2)

    def clip(self, glyph_index: int, motion: Motion, rng: np.random.Generator) -> np.ndarray:
        return np.stack([self.frame(glyph_index, tuple(corner)) for corner in self.path(motion, rng)])

    def still(self, glyph_index: int, rng: np.random.Generator) -> np.ndarray:
        corner = rng.integers(0, self.room + 1, size=2)
        return self.frame(glyph_index, (int(corner[0]), int(corner[1])))


def encode_clip(frames: np.ndarray, path: Path, fps: int = FPS) -> None:
    """Write ``[F, H, W, 3] uint8`` frames as an H.264 MP4 (keyframe every 4 frames), the same bytes every run."""
    # Every stage is pinned so that a seed always gives the same bytes: the colour conversion is
    # integer arithmetic here rather than swscale (whose rounding depends on the CPU's SIMD path
    # unless asked to be bit-exact); x264 runs without macroblock-tree rate control (see
    # mmsphere.data.h264), on one thread with no lookahead or sliced threads; codec and muxer run
    # bit-exact, so no library version strings or creation times are written.
    with av.open(str(path), "w", format="mp4", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = x264_options(crf=18, preset="veryfast", gop=4, single_thread=True, bitexact=True)
        stream.codec_context.thread_count = 1
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb_to_yuv420p(frame), format="yuv420p")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def rgb_to_yuv420p(frame: np.ndarray) -> np.ndarray:
    """``[H, W, 3] uint8`` RGB (H, W even) as PyAV's planar ``[3H/2, W]`` yuv420p array (BT.601, limited range).

    Integer arithmetic (the usual 8-bit approximation of the BT.601 matrix), so the result is the
    same on every machine; each chroma sample comes from the mean colour of its 2x2 block.
    """
    height, width = frame.shape[:2]
    rgb = frame.astype(np.int32)
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    luma = ((66 * red + 129 * green + 25 * blue + 128) >> 8) + 16
    # sums over each 2x2 block: four times the block's mean colour, hence the shift by 8 + 2 bits
    block = rgb.reshape(height // 2, 2, width // 2, 2, 3).sum(axis=(1, 3))
    red4, green4, blue4 = block[..., 0], block[..., 1], block[..., 2]
    blue_difference = ((-38 * red4 - 74 * green4 + 112 * blue4 + 512) >> 10) + 128
    red_difference = ((112 * red4 - 94 * green4 - 18 * blue4 + 512) >> 10) + 128
    planes = np.concatenate([luma.ravel(), blue_difference.ravel(), red_difference.ravel()])
    return planes.astype(np.uint8).reshape(height * 3 // 2, width)


def _random_motion(digit: int, rng: np.random.Generator) -> Motion:
    first, second = rng.choice(list(DIRECTIONS), size=2, replace=False)
    return Motion(digit, str(first), str(second))


def _wrong_motion(truth: Motion, rng: np.random.Generator) -> Motion:
    """A different description: a third of them the same digit with the motions swapped (hard)."""
    if rng.random() < 1 / 3:
        return Motion(truth.digit, truth.second, truth.first)
    while True:
        candidate = _random_motion(int(rng.integers(10)), rng)
        if candidate != truth:
            return candidate


def _video_captions(motion: Motion, rng: np.random.Generator, count: int = 2) -> list[str]:
    templates = rng.choice(len(VIDEO_TEMPLATES), size=count, replace=False)
    return [motion.caption(VIDEO_TEMPLATES[index]) for index in templates]


def _image_captions(digit: int, rng: np.random.Generator, count: int = 2) -> list[str]:
    templates = rng.choice(len(IMAGE_TEMPLATES), size=count, replace=False)
    return [IMAGE_TEMPLATES[index].format(numeral=digit, word=DIGIT_WORDS[digit]) for index in templates]


def _video_split(
    prefix: str,
    count: int,
    pool: list[int],
    renderer: _Renderer,
    rng: np.random.Generator,
    staging: Path,
    bar: tqdm,
    mismatch_fraction: float = 0.0,
    mismatched: dict[str, str] | None = None,
) -> list[dict]:
    """Clips of random motions; a ``mismatch_fraction`` of them captioned with another motion."""
    wrong = set(rng.choice(count, size=round(mismatch_fraction * count), replace=False).tolist())
    rows = []
    for index in range(count):
        glyph = int(pool[rng.integers(len(pool))])
        truth = _random_motion(renderer.labels[glyph], rng)
        key = f"{prefix}-{index:06d}"
        path = staging / f"{key}.mp4"
        encode_clip(renderer.clip(glyph, truth, rng), path)
        captions = _video_captions(truth, rng)
        if index in wrong:
            mismatched[key] = captions[0]
            captions = _video_captions(_wrong_motion(truth, rng), rng)
        rows.append({"list": {"key": key, "path": str(path), "captions": captions}, "label": truth.digit})
        bar.update()
    return rows


def _reversed_pairs(
    prefix: str, count: int, pool: list[int], renderer: _Renderer, rng: np.random.Generator, staging: Path, bar: tqdm
) -> list[dict]:
    """Pairs of clips of one digit image: a motion, then the same two directions in reverse order."""
    rows = []
    for pair in range(count // 2):
        glyph = int(pool[rng.integers(len(pool))])
        motion = _random_motion(renderer.labels[glyph], rng)
        template = VIDEO_TEMPLATES[int(rng.integers(len(VIDEO_TEMPLATES)))]
        for order, shown in enumerate((motion, Motion(motion.digit, motion.second, motion.first))):
            key = f"{prefix}-{2 * pair + order:06d}"
            path = staging / f"{key}.mp4"
            encode_clip(renderer.clip(glyph, shown, rng), path)
            rows.append({"list": {"key": key, "path": str(path), "caption": shown.caption(template)},
                         "label": shown.digit})
            bar.update()
    return rows


def _image_split(
    prefix: str,
    count: int,
    pool: list[int],
    renderer: _Renderer,
    rng: np.random.Generator,
    staging: Path,
    bar: tqdm,
    mismatch_fraction: float = 0.0,
    mismatched: dict[str, str] | None = None,
    without_repeats: bool = False,
) -> list[dict]:
    """Still digits captioned with their class; a ``mismatch_fraction`` of them with another digit."""
    if without_repeats and count > len(pool):
        raise ValueError(f"{prefix}: {count} images asked for, only {len(pool)} digit images held out")
    chosen = rng.choice(len(pool), size=count, replace=not without_repeats)
    wrong = set(rng.choice(count, size=round(mismatch_fraction * count), replace=False).tolist())
    rows = []
    for index, position in enumerate(chosen):
        glyph = int(pool[position])
        digit = renderer.labels[glyph]
        key = f"{prefix}-{index:06d}"
        path = staging / f"{key}.png"
        Image.fromarray(renderer.still(glyph, rng)).save(path)
        captions = _image_captions(digit, rng)
        if index in wrong:
            mismatched[key] = captions[0]
            other = int((digit + rng.integers(1, 10)) % 10)
            captions = _image_captions(other, rng)
        rows.append({"list": {"key": key, "path": str(path), "captions": captions}, "label": digit})
        bar.update()
    return rows


def main(argv: list[str] | None = None) -> int:
    """``python -m mmsphere.data.demo --out DIR``: build the demo data set."""
    parser = argparse.ArgumentParser(prog="python -m mmsphere.data.demo", description=build_demo_data.__doc__)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mismatch-fraction", type=float, default=0.2)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        meta = build_demo_data(args.out, seed=args.seed, mismatch_fraction=args.mismatch_fraction,
                               overwrite=args.overwrite, progress=True)
    except (FileExistsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for split, info in meta["splits"].items():
        print(f"{split:<12} {info['modality']:<6} {info['samples']:>5} samples  {info['urls']}")
    print(f"{len(meta['mismatched_keys'])} mismatched captions; built in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
