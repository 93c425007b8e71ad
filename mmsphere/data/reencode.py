"""Re-encoding of videos above a size or frame-rate limit to H.264 (libx264 through PyAV), for smaller shards."""

from __future__ import annotations

import io
from fractions import Fraction
from pathlib import Path

import av

from mmsphere.data.h264 import x264_options


class ReencodeError(Exception):
    """A video could not be decoded or re-encoded."""


def reencode_video(path: str | Path, *, max_side: int | None = None, max_fps: float | None = None) -> bytes | None:
    """H.264 re-encode of a video whose longer side exceeds ``max_side`` or frame rate exceeds ``max_fps``.

    Returns the new MP4 bytes (video only, CRF 23; the same bytes on every run on one machine, as the
    shard builder promises), or None when the video is within both limits.
    """
    try:
        with av.open(str(path)) as source:
            stream = source.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            rate = stream.average_rate or stream.guessed_rate
            too_big = max_side is not None and max(width, height) > max_side
            too_fast = max_fps is not None and rate is not None and rate > max_fps
            if not (too_big or too_fast):
                return None
            scale = max_side / max(width, height) if too_big else 1.0
            new_width, new_height = (max(2, int(round(side * scale / 2)) * 2) for side in (width, height))
            new_rate = Fraction(max_fps).limit_denominator(1001) if too_fast else Fraction(rate)
            output = io.BytesIO()
            with av.open(output, "w", format="mp4") as target:
                encoder = target.add_stream("libx264", rate=new_rate)
                encoder.width, encoder.height, encoder.pix_fmt = new_width, new_height, "yuv420p"
                encoder.options = x264_options(crf=23, preset="veryfast")
                next_time, written = 0.0, 0
                for frame in source.decode(stream):
                    time = frame.time if frame.time is not None else written / float(new_rate)
                    if too_fast and time + 1e-6 < next_time:
                        continue
                    next_time += 1.0 / float(new_rate)
                    scaled = frame.reformat(width=new_width, height=new_height, format="yuv420p")
                    scaled.pts = written
                    scaled.time_base = Fraction(1) / new_rate
                    for packet in encoder.encode(scaled):
                        target.mux(packet)
                    written += 1
                for packet in encoder.encode():
                    target.mux(packet)
            return output.getvalue()
    except Exception as error:
        raise ReencodeError(f"re-encoding failed: {type(error).__name__}: {error}") from None
