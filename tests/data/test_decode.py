"""Video and image decoding on real encoded media, checked against the frames' own content and PyAV/PIL references."""

import io
import warnings
from fractions import Fraction

import av
import numpy as np
import pytest
from PIL import Image

import mmsphere.data.decode as decode_module
from mmsphere.data.decode import DecodeError, decode_image, decode_video


def expected_indices(num_frames: int, frames: int) -> list[int]:
    if num_frames <= frames:
        return list(range(num_frames))
    return [int(Fraction(step * (num_frames - 1), frames - 1) + Fraction(1, 2)) for step in range(frames)]


def index_from_content(frame: np.ndarray) -> int:
    """Read back the frame index written by ``frame_pattern`` (grey level 20 + 6 i, away from the red bar)."""
    grey = float(frame[-1, -1].mean())
    return int(round((grey - 20) / 6))


def reference_frames(data: bytes) -> list[np.ndarray]:
    """Every frame, decoded sequentially by PyAV: the straightforward way, no seeking, no index logic."""
    with av.open(io.BytesIO(data)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


VIDEOS = {
    "h264_with_audio": dict(width=32, height=32, frames=30, audio=True),
    "odd_size": dict(width=38, height=22, frames=20),
    "odd_size_yuv444": dict(width=37, height=23, frames=20, pix_fmt="yuv444p"),
    "portrait": dict(width=32, height=64, frames=20, audio=True),
    "portrait_narrow": dict(width=24, height=48, frames=20),
    "vp9_webm": dict(width=32, height=32, frames=20, codec="libvpx-vp9", container_format="webm"),
    "vp8_webm_with_audio": dict(width=32, height=32, frames=20, codec="libvpx", container_format="webm", audio=True),
}


@pytest.mark.parametrize("name", VIDEOS)
def test_exact_decoding_returns_the_uniform_frames(media, name):
    if VIDEOS[name].get("codec", "libx264") not in av.codecs_available:
        pytest.skip(f"this PyAV build has no {VIDEOS[name]['codec']} encoder")
    data = media.video(**VIDEOS[name])
    total = VIDEOS[name]["frames"]
    clip = decode_video(data, 8)
    assert clip.num_frames == total
    assert clip.indices == expected_indices(total, 8)
    assert clip.frames.shape == (8, VIDEOS[name]["height"], VIDEOS[name]["width"], 3)
    assert [index_from_content(frame) for frame in clip.frames] == clip.indices
    reference = reference_frames(data)
    for frame, index in zip(clip.frames, clip.indices):
        assert np.abs(frame.astype(int) - reference[index].astype(int)).max() <= 2


def test_pyav_fallback_gives_the_same_frames(media, monkeypatch):
    data = media.video(width=32, height=32, frames=25, audio=True)
    exact = decode_video(data, 8)

    def decord_fails(*args, **kwargs):
        raise RuntimeError("decord cannot open this file")

    monkeypatch.setattr(decode_module, "_decode_with_decord", decord_fails)
    fallback = decode_video(data, 8)
    assert fallback.backend == "pyav" and exact.backend == "decord"
    assert fallback.indices == exact.indices and fallback.num_frames == 25
    assert np.abs(fallback.frames.astype(int) - exact.frames.astype(int)).max() <= 2


def test_clip_shorter_than_t_gives_all_its_frames(media):
    clip = decode_video(media.video(frames=3), 8)
    assert clip.indices == [0, 1, 2] and clip.num_frames == 3 and clip.frames.shape[0] == 3
    assert [index_from_content(frame) for frame in clip.frames] == [0, 1, 2]


def test_fast_mode_returns_the_keyframe_nearest_each_uniform_index(media):
    gop, total = 5, 40
    data = media.video(frames=total, gop=gop)
    with av.open(io.BytesIO(data)) as container:
        packets = sorted((packet for packet in container.demux(video=0) if packet.size), key=lambda p: p.pts)
        keyframes = [position for position, packet in enumerate(packets) if packet.is_keyframe]
    assert keyframes == list(range(0, total, gop))  # the encoder did what was asked
    clip = decode_video(data, 8, fast=True)
    targets = expected_indices(total, 8)
    nearest = [min(keyframes, key=lambda keyframe: (abs(keyframe - target), keyframe)) for target in targets]
    assert clip.backend == "pyav-keyframes"
    assert clip.indices == nearest
    assert [index_from_content(frame) for frame in clip.frames] == nearest
    reference = reference_frames(data)
    for frame, index in zip(clip.frames, clip.indices):
        assert np.abs(frame.astype(int) - reference[index].astype(int)).max() <= 2


def test_fast_mode_decodes_short_clips_exactly(media):
    clip = decode_video(media.video(frames=6, gop=5), 8, fast=True)
    assert clip.backend == "decord" and clip.indices == list(range(6))


@pytest.mark.parametrize(
    "case,reason",
    [
        ("audio_only", "no_video_stream"),
        ("zero_bytes", "empty_media"),
        ("garbage", "video_decode_error"),
        ("truncated", "video_decode_error"),
    ],
)
def test_undecodable_videos_raise_a_skip_reason(media, case, reason):
    data = {
        "audio_only": lambda: media.video(video=False, audio=True),
        "zero_bytes": lambda: b"",
        "garbage": lambda: np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "truncated": lambda: media.video(frames=30)[:700],
    }[case]()
    for fast in (False, True):
        with pytest.raises(DecodeError) as caught:
            decode_video(data, 8, fast=fast)
        assert caught.value.reason == reason


@pytest.mark.parametrize("image_format,mode", [("PNG", "RGB"), ("JPEG", "RGB"), ("WEBP", "RGB"), ("PNG", "L"),
                                               ("PNG", "RGBA"), ("PNG", "P")])
def test_images_decode_like_pil(media, image_format, mode):
    rgb = Image.open(io.BytesIO(media.image(41, 27, "PNG")))
    buffer = io.BytesIO()
    rgb.convert(mode).save(buffer, format=image_format)
    data = buffer.getvalue()
    pixels = decode_image(data)
    assert pixels.shape == (27, 41, 3) and pixels.dtype == np.uint8
    assert np.array_equal(pixels, np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))


@pytest.mark.parametrize("options", [
    dict(subsampling=0), dict(subsampling=1), dict(subsampling=2), dict(subsampling=2, progressive=True),
    dict(subsampling=0, quality=98, optimize=True), dict(subsampling=2, quality=30), dict(mode="L"),
    dict(mode="CMYK"), dict(subsampling=2, size=(17, 33)), dict(subsampling=2, size=(640, 427)),
])
def test_jpegs_decode_to_pils_exact_pixels(media, options):
    """Every JPEG kind (4:4:4/4:2:2/4:2:0, progressive, odd sizes, grey, CMYK) gives PIL's own pixels, bit for
    bit, at full size (exact mode) and in fast mode when no DCT scaling applies (the fast decoder's path)."""
    options = dict(options)
    mode, size = options.pop("mode", "RGB"), options.pop("size", (61, 45))
    photo = Image.open(io.BytesIO(media.image(*size, "PNG"))).convert(mode)
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", **options)
    data = buffer.getvalue()
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    for draft_size in (None, min(size)):
        pixels = decode_image(data, draft_size=draft_size)
        assert pixels.shape == (size[1], size[0], 3) and pixels.dtype == np.uint8
        assert np.array_equal(pixels, expected)


def test_decompression_bomb_is_refused_before_decoding(media):
    bomb = media.png_bomb(10_000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        assert len(bomb) < 1_000_000 and Image.open(io.BytesIO(bomb)).size == (10_000, 10_000)
    with pytest.raises(DecodeError) as caught:
        decode_image(bomb)
    assert caught.value.reason == "image_too_large" and "100000000 pixels" in str(caught.value)


def test_pixel_limit_is_configurable(media):
    data = media.image(64, 64)
    assert decode_image(data, max_pixels=64 * 64).shape == (64, 64, 3)
    with pytest.raises(DecodeError, match="image_too_large"):
        decode_image(data, max_pixels=64 * 64 - 1)


@pytest.mark.parametrize(
    "case,reason",
    [("zero_bytes", "empty_media"), ("garbage", "image_decode_error"), ("truncated_jpeg", "image_decode_error"),
     ("eps_named_jpg", "image_decode_error")],
)
def test_undecodable_images_raise_a_skip_reason(media, case, reason):
    data = {
        "zero_bytes": b"",
        "garbage": bytes(range(256)) * 8,
        "truncated_jpeg": media.image(64, 48, "JPEG")[:300],
        # PostScript that PIL would hand to Ghostscript; only plain image formats are ever opened
        "eps_named_jpg": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\nshowpage\n",
    }[case]
    with pytest.raises(DecodeError) as caught:
        decode_image(data)
    assert caught.value.reason == reason


def test_fast_mode_lets_jpeg_decode_at_a_reduced_scale(media):
    jpeg = media.image(640, 480, "JPEG")
    full = decode_image(jpeg)
    scaled = decode_image(jpeg, draft_size=224)
    assert full.shape == (480, 640, 3)
    assert scaled.shape == (240, 320, 3)  # the largest 1/2^k scale keeping both sides >= 224
    halved = np.asarray(Image.fromarray(full).resize((320, 240), Image.BOX)).astype(float)
    same = np.abs(scaled.astype(float) - halved).mean()
    other = np.abs(scaled.astype(float) - halved[::-1]).mean()
    assert same < 6.0 and other > 5 * same  # the same picture at half size (up to JPEG's own rounding)
    png = media.image(640, 480, "PNG")
    assert decode_image(png, draft_size=224).shape == (480, 640, 3)  # only JPEG has DCT scaling
