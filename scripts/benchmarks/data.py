"""Data pipeline throughput: ``python scripts/benchmark.py data [--repeats 3] [--quick]``.

Video: clips/s through the full training stream (tar reading, decoding T=8 frames, resize + crop +
normalise, tokenisation, collation; 224 and 112 px; 1 and 2 loader workers) in exact mode and in
the fast keyframe mode, against a bare loop that reads the same tar members and decodes them with
decord's exact ``get_batch`` at the same frame indices, nothing else. Images: pairs/s through the
stream (exact, and fast = JPEG DCT-domain downscaling) against a bare PIL decode loop over the same
members, and the floor: the passes no image pipeline avoids (the fastest exact JPEG decoder,
torchvision's, then the resize and crop). ``--only image`` runs the image half. Every configuration runs once per
repetition, in turn, so that load on the machine hits all of them alike; the reported figure is
the median over repetitions.

The clips are generated here with PyAV (H.264 with a GOP of 2-5 s, AAC audio, a camera pan over a
real COCO photograph, or a multi-scale texture without the shared data, moving objects and sensor
noise, 480p and 1080p, 11-30 s) and cached under ``runs/bench_clips/``. Images are the real COCO photos of ``/work/shared/data/coco_mini`` when
present, otherwise generated JPEGs of the same size.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import av
import decord
import numpy as np
import open_clip
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from mmsphere.data.config import DataConfig, SourceConfig
from mmsphere.data import build_train_stream
from mmsphere.data.h264 import x264_options
from mmsphere.data.shards import ListEntry, write_shards
from mmsphere.data.transforms import resize_center_crop, sample_frame_indices

ROOT = Path(__file__).resolve().parents[2]
CLIPS = (  # name, width, height, seconds, fps, GOP in seconds
    ("480p-12s-gop2", 854, 480, 12, 30, 2.0),
    ("480p-30s-gop5", 854, 480, 30, 25, 5.0),
    ("1080p-11s-gop2.5", 1920, 1080, 11, 30, 2.5),
    ("1080p-20s-gop4", 1920, 1080, 20, 25, 4.0),
)
COCO = Path("/work/shared/data/coco_mini")
FRAMES = 8


def main(argv: list[str]) -> int:
    """Run the data benchmark and print a Markdown table."""
    parser = argparse.ArgumentParser(prog="python scripts/benchmark.py data", description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="480p clips only, one repetition (a smoke run)")
    parser.add_argument("--cache", default=str(ROOT / "runs" / "bench_clips"))
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench" / "data.json"))
    parser.add_argument("--only", choices=("video", "image"), help="run one half of the benchmark")
    args = parser.parse_args(argv)
    repeats = 1 if args.quick else args.repeats
    cache = Path(args.cache)
    clips = [clip for clip in CLIPS if not args.quick or clip[0].startswith("480p")]
    video_urls = build_video_shards(cache, clips)
    image_urls = build_image_shards(cache)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")

    # "0w" runs the stream inside this process (data.workers=0), "1w"/"2w" in loader worker processes
    video_configs = [("bare decord get_batch", None)] + [
        (f"{mode} {size}px {workers}w", dict(fast=mode == "fast", size=size, workers=workers))
        for mode in ("exact", "fast") for size in (224, 112) for workers in (0, 1, 2)
        if workers or size == 224
    ]
    if args.only == "image":
        video_configs = []
    image_configs = [("bare PIL decode", None), ("floor: decode + resize", "floor")] + [
        (f"{mode} 224px {workers}w", dict(fast=mode == "fast", size=224, workers=workers))
        for mode in ("exact", "fast") for workers in (0, 1, 2)
    ]
    video_rates: dict[str, list[float]] = {name: [] for name, _ in video_configs}
    image_rates: dict[str, list[float]] = {name: [] for name, _ in image_configs}
    video_count = 2 * len(clips)
    image_passes = 4
    for repeat in range(repeats):
        for name, config in video_configs:
            if config is None:
                rate = bare_video_rate(video_urls)
            else:
                rate = stream_rate(video_urls, "video", video_count, tokenizer, batch_size=2, **config)
            video_rates[name].append(rate)
            print(f"[{repeat + 1}/{repeats}] video {name:<24} {rate:7.2f} clips/s", flush=True)
        for name, config in image_configs if args.only != "video" else []:
            if config is None:
                rate = bare_image_rate(image_urls, image_passes)
            elif config == "floor":
                rate = floor_image_rate(image_urls, image_passes)
            else:
                count = image_passes * count_members(image_urls, (".jpg", ".jpeg", ".png"))
                rate = stream_rate(image_urls, "image", count, tokenizer, batch_size=32, **config)
            image_rates[name].append(rate)
            print(f"[{repeat + 1}/{repeats}] image {name:<24} {rate:7.1f} pairs/s", flush=True)

    report = {
        "command": "python scripts/benchmark.py data" + (" --quick" if args.quick else f" --repeats {repeats}"),
        "machine": machine(),
        "clips": [dict(zip(("name", "width", "height", "seconds", "fps", "gop_s"), clip)) for clip in clips],
        "video_clips_per_s": video_rates,
        "image_pairs_per_s": image_rates,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print_table(report)
    return 0


def print_table(report: dict) -> None:
    """Markdown tables: median rate, and the median over repetitions of the ratio to that repetition's bare loop."""
    for kind, unit, rates in (("video, T=8", "clips/s", report["video_clips_per_s"]),
                              ("image", "pairs/s", report["image_pairs_per_s"])):
        names = list(rates)
        if not names or not rates[names[0]]:
            continue
        baseline = rates[names[0]]
        print(f"\n| {kind} | {unit} (median) | x bare loop (median of per-run ratios) | runs ({unit}) |")
        print("|---|---|---|---|")
        for name in names:
            ratio = statistics.median(rate / base for rate, base in zip(rates[name], baseline))
            runs = ", ".join(f"{rate:.2f}" for rate in rates[name])
            print(f"| {name} | {statistics.median(rates[name]):.2f} | {ratio:.2f}x | {runs} |")
    print(f"\nmachine: {report['machine']}")


def machine() -> str:
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    return (f"{platform.processor() or platform.machine()}, nproc={os.cpu_count()}, torch {torch.__version__}, "
            f"decord {decord.__version__}, PyAV {av.__version__}, load average at the end {load}")


# --------------------------------------------------------------------------------------------
# the contenders


def bare_video_rate(urls: list[str]) -> float:
    """The baseline: tar members -> decord VideoReader -> exact get_batch at the same indices."""
    started, count = time.perf_counter(), 0
    for url in urls:
        with tarfile.open(url) as archive:
            for member in archive:
                if member.name.endswith(".mp4"):
                    data = archive.extractfile(member).read()
                    reader = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0))
                    reader.get_batch(sample_frame_indices(len(reader), FRAMES)).asnumpy()
                    count += 1
    return count / (time.perf_counter() - started)


def image_members(urls: list[str], passes: int, suffixes: tuple[str, ...]) -> Iterator[bytes]:
    """The bytes of every tar member with one of ``suffixes``, ``passes`` times over."""
    for _ in range(passes):
        for url in urls:
            with tarfile.open(url) as archive:
                for member in archive:
                    if member.name.endswith(suffixes):
                        yield archive.extractfile(member).read()


def bare_image_rate(urls: list[str], passes: int) -> float:
    """The baseline: tar members -> PIL decode to RGB."""
    started, count = time.perf_counter(), 0
    for data in image_members(urls, passes, (".jpg", ".jpeg", ".png")):
        np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        count += 1
    return count / (time.perf_counter() - started)


def floor_image_rate(urls: list[str], passes: int) -> float:
    """The passes a pipeline cannot avoid: tar members -> the fastest exact JPEG decoder -> short side to 224 + crop."""
    started, count = time.perf_counter(), 0
    for data in image_members(urls, passes, (".jpg", ".jpeg")):
        planes = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        resize_center_crop(planes[None], 224)
        count += 1
    return count / (time.perf_counter() - started)


def stream_rate(urls, modality, count, tokenizer, *, batch_size, fast, size, workers) -> float:
    """Samples/s of one virtual epoch of ``count`` samples through ``build_train_stream``, worker start-up included."""
    data = DataConfig(frames=FRAMES, workers=workers, shuffle_buffer=0, resampled=False, fast_decode=fast,
                      epoch_samples=count)
    source = SourceConfig(urls="::".join(urls), modality=modality, name=modality)
    stream = build_train_stream([source], data, image_size=size, image_mean=open_clip.OPENAI_DATASET_MEAN,
                                image_std=open_clip.OPENAI_DATASET_STD, tokenizer=tokenizer, batch_size=batch_size)
    started, seen = time.perf_counter(), 0
    for batch in stream:
        seen += len(batch)
    return seen / (time.perf_counter() - started)


def count_members(urls: list[str], suffixes: tuple[str, ...]) -> int:
    total = 0
    for url in urls:
        with tarfile.open(url) as archive:
            total += sum(1 for member in archive if member.name.endswith(suffixes))
    return total


# --------------------------------------------------------------------------------------------
# test material


def build_video_shards(cache: Path, clips) -> list[str]:
    """Two shards holding every clip once each (one shard per worker)."""
    cache.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, width, height, seconds, fps, gop in clips:
        path = cache / f"{name}.mp4"
        if not path.exists():
            print(f"generating {path} (once; cached)", flush=True)
            make_clip(path, width, height, seconds, fps, gop)
        paths.append(path)
    folder = cache / ("shards-" + "-".join(clip[0] for clip in clips))
    entries = [ListEntry(f"{copy}-{path.stem.replace('.', '_')}", path, [f"a benchmark clip {path.stem}"],
                         split=copy) for copy in ("a", "b") for path in paths]
    if not (folder / "b" / "sizes.json").exists():
        write_shards(entries, folder, overwrite=True, progress=False)
    return [str(folder / copy / "shard-000000.tar") for copy in ("a", "b")]


def build_image_shards(cache: Path) -> list[str]:
    folder = cache / "image-shards"
    if not (folder / "b" / "sizes.json").exists():
        sources = sorted(COCO.glob("*2017/*.jpg"))
        if not sources:
            sources = []
            generated = cache / "generated-images"
            generated.mkdir(parents=True, exist_ok=True)
            for index in range(160):
                path = generated / f"image{index:04d}.jpg"
                Image.fromarray(texture(480, 640, np.random.default_rng(index))).save(path, quality=90)
                sources.append(path)
        entries = [ListEntry(f"img{index:04d}", path, [f"a photo {index}"], split="ab"[index % 2])
                   for index, path in enumerate(sources)]
        write_shards(entries, folder, overwrite=True, progress=False)
    return [str(folder / copy / "shard-000000.tar") for copy in ("a", "b")]


def texture(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A multi-scale random colour texture (what camera footage of a detailed scene compresses like)."""
    image = np.zeros((height, width, 3), np.float32)
    for octave in range(7):
        cells = 2 ** (octave + 2)
        noise = rng.random((cells * height // width + 2, cells + 2, 3)).astype(np.float32)
        layer = np.asarray(Image.fromarray((noise * 255).astype(np.uint8)).resize((width, height), Image.BICUBIC))
        image += layer.astype(np.float32) / (octave + 1)
    image -= image.min()
    return (image * (255.0 / image.max())).astype(np.uint8)


def make_clip(path: Path, width: int, height: int, seconds: float, fps: int, gop_seconds: float) -> None:
    """A camera pan over a photo (or texture) with moving objects, sensor noise and a sine-tone audio track."""
    rng = np.random.default_rng(width + int(seconds))
    photos = sorted(COCO.glob("*2017/*.jpg"))
    scene_size = (int(width * 1.5), int(height * 1.5))
    if photos:  # a real photograph as the scene, when the shared COCO subset is there
        photo = Image.open(photos[(width + int(seconds)) % len(photos)]).convert("RGB")
        scene = np.asarray(photo.resize(scene_size, Image.BICUBIC))
    else:
        scene = texture(scene_size[1], scene_size[0], rng)
    frames = int(seconds * fps)
    gop = int(gop_seconds * fps)
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.options = x264_options(crf=23, preset="veryfast", gop=gop)
        audio = container.add_stream("aac", rate=44100)
        audio_samples = 0
        for index in range(frames):
            progress = index / frames
            top = int(progress * (scene.shape[0] - height))
            left = int((0.5 + 0.5 * np.sin(2 * np.pi * progress)) * (scene.shape[1] - width))
            frame = scene[top : top + height, left : left + width].copy()
            for blob in range(3):
                row = int(height * (0.3 + 0.2 * blob + 0.1 * np.sin(index / (9 + blob))))
                column = int((index * (5 + 3 * blob) + blob * width // 3) % width)
                radius = height // (12 + 2 * blob)
                frame[max(0, row - radius) : row + radius, max(0, column - radius) : column + radius] = (
                    (230, 80, 40), (40, 200, 90), (60, 90, 230))[blob]
            noise = rng.integers(-8, 9, frame.shape, dtype=np.int16)
            frame = np.clip(frame.astype(np.int16) + noise, 0, 255).astype(np.uint8)
            for packet in video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
            while audio_samples < (index + 1) * 44100 / fps:
                tone = 0.1 * np.sin(2 * np.pi * 220 * (audio_samples + np.arange(1024)) / 44100)
                chunk = av.AudioFrame.from_ndarray(tone.astype(np.float32)[None], format="fltp", layout="mono")
                chunk.sample_rate, chunk.pts = 44100, audio_samples
                for packet in audio.encode(chunk):
                    container.mux(packet)
                audio_samples += 1024
        for stream in (video, audio):
            for packet in stream.encode():
                container.mux(packet)
