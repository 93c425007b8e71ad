"""libx264 options (for PyAV's ``stream.options``) under which the same frames give the same bytes on every run."""

from __future__ import annotations

# x264's macroblock-tree rate control (``mbtree``, on in every preset from veryfast up) is off. On
# an AVX-512 CPU its lookahead reads uninitialised memory on tiny frames: 30 same-seed builds of the
# demo set in one process gave 2-16 distinct results (a few of the 32x32 clips 1-2 bytes longer or
# shorter in one group of pictures), while a fresh process, whose heap starts zeroed, or one run
# with glibc's MALLOC_PERTURB_ always gave the same bytes. Without mbtree, or with x264's SIMD
# capped at AVX2, every repeat is identical. ``mbtree=0`` is a rate-control switch that every x264
# build on every architecture reads alike. A SIMD cap would not be: x264 takes ``asm=AVX2`` as the
# exact set of code paths to run without checking that the CPU has them (an x86 CPU without AVX2
# would stop on an illegal instruction), and on ARM, whose list has no such name, FFmpeg only warns
# and x264 falls back to plain C; ``asm=0`` (plain C everywhere) is safe but slower.
DETERMINISTIC_PARAMS = ("mbtree=0",)
# x264's output depends on its thread count, which by default follows the number of CPU cores.
SINGLE_THREAD_PARAMS = ("threads=1", "lookahead-threads=1", "sliced-threads=0")


def x264_options(
    *,
    crf: int,
    preset: str = "medium",
    gop: int | None = None,
    single_thread: bool = False,
    bitexact: bool = False,
) -> dict[str, str]:
    """Options for a ``libx264`` stream: quality ``crf``, ``preset``, and the same bytes for the same frames.

    ``gop``: a keyframe exactly every ``gop`` frames (no scene-cut keyframes). ``single_thread``:
    one encoding thread, so the bytes do not depend on the machine's core count either (slower on
    large frames). ``bitexact``: no library version string in the stream (pair it with the muxer's
    ``fflags=+bitexact``).
    """
    params = DETERMINISTIC_PARAMS + (SINGLE_THREAD_PARAMS if single_thread else ())
    options = {"crf": str(crf), "preset": preset, "x264-params": ":".join(params)}
    if gop is not None:
        options.update({"g": str(gop), "keyint_min": str(gop), "sc_threshold": "0"})
    if bitexact:
        options["flags"] = "+bitexact"
    return options
