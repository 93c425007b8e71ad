"""The shard builder: sample-list entries -> checked media -> webdataset tar shards.

:func:`make_shards` reads a list (:mod:`mmsphere.data.sample_list`: CSV, JSONL or the MSR-VTT
1k-A CSV) and hands its entries to :func:`write_shards`, which checks that every media file
exists and opens as an image or a video, re-encodes videos above ``max_side``/``max_fps``
(:mod:`mmsphere.data.reencode`) and writes the tars.

Output: ``OUT/shard-000000.tar``, ... and ``OUT/sizes.json`` (shard file name -> samples), or one
such folder per ``split`` value (``OUT/<split>/``). A sample is ``KEY.<ext>`` holding the media
bytes exactly as they were (unless re-encoding is asked for) plus ``KEY.txt`` (one caption) or
``KEY.json`` (``{"captions": [...]}``). Shards are written under a temporary name and renamed,
with fixed tar metadata, so the same list gives byte-identical shards. A split none of whose
samples could be written is left as it was: no shards, no ``sizes.json``, earlier shards kept.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import av
from PIL import Image
from tqdm import tqdm

from mmsphere.atomic import write_text_atomic
from mmsphere.config import ConfigError
from mmsphere.data.decode import IMAGE_FORMATS
from mmsphere.data.reencode import ReencodeError, reencode_video
from mmsphere.data.sample_list import ListEntry, SkippedInput, read_sample_list
from mmsphere.data.samples import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS

logger = logging.getLogger(__name__)

SHARD_PATTERN = "shard-%06d.tar"
SIZES_FILE = "sizes.json"
DEFAULT_MAXCOUNT = 1000
DEFAULT_MAXSIZE = 1 << 30

# Why an input line did not become a sample: the list reader's reasons and the media checks'.
INPUT_SKIP_REASONS = {
    "missing": "the media file does not exist",
    "unreadable": "the media file cannot be read or is not a decodable image/video",
    "unsupported_extension": f"the media extension is not one of {', '.join(VIDEO_EXTENSIONS + IMAGE_EXTENSIONS)}",
    "no_caption": "the line has no non-empty caption",
    "bad_line": "the line cannot be parsed or lacks the media path",
    "duplicate_key": "the key was already used by an earlier line",
}


@dataclass
class ShardSummary:
    """What :func:`write_shards` wrote and what it left out."""

    out_dir: Path
    shards: dict[str, list[Path]] = field(default_factory=dict)  # split ("" = none) -> shard files
    samples: dict[str, int] = field(default_factory=dict)
    skipped: list[SkippedInput] = field(default_factory=list)

    def url_pattern(self, split: str = "") -> str:
        """A brace pattern naming every shard of ``split``, e.g. ``OUT/shard-{000000..000003}.tar``."""
        paths = self.shards.get(split)
        if not paths:
            raise KeyError(f"no shards were written for split {split!r}")
        folder = paths[0].parent
        if len(paths) == 1:
            return str(paths[0])
        return str(folder / f"shard-{{{0:06d}..{len(paths) - 1:06d}}}.tar")

    def skipped_by_reason(self) -> dict[str, int]:
        """Number of skipped inputs per reason."""
        return dict(Counter(item.reason for item in self.skipped))


def make_shards(
    list_path: str | Path,
    out_dir: str | Path,
    *,
    media_root: str | Path | None = None,
    maxcount: int = DEFAULT_MAXCOUNT,
    maxsize: int = DEFAULT_MAXSIZE,
    overwrite: bool = False,
    max_side: int | None = None,
    max_fps: float | None = None,
    progress: bool = True,
) -> ShardSummary:
    """Read a sample list and write its shards (the ``mmsphere make-shards`` command as a function)."""
    entries, skipped = read_sample_list(list_path, media_root=media_root)
    return write_shards(
        entries,
        out_dir,
        maxcount=maxcount,
        maxsize=maxsize,
        overwrite=overwrite,
        max_side=max_side,
        max_fps=max_fps,
        progress=progress,
        skipped=skipped,
    )


# --------------------------------------------------------------------------------------------
# writing shards


def write_shards(
    entries: Sequence[ListEntry],
    out_dir: str | Path,
    *,
    maxcount: int = DEFAULT_MAXCOUNT,
    maxsize: int = DEFAULT_MAXSIZE,
    overwrite: bool = False,
    max_side: int | None = None,
    max_fps: float | None = None,
    progress: bool = True,
    skipped: list[SkippedInput] | None = None,
) -> ShardSummary:
    """Write ``entries`` into ``out_dir`` (one sub-folder per split); media are checked as they are written."""
    if maxcount < 1:
        raise ValueError(f"maxcount={maxcount} must be >= 1")
    if maxsize < 1:
        raise ValueError(f"maxsize={maxsize} must be >= 1")
    if max_side is not None and max_side < 2:
        raise ValueError(f"max_side={max_side} must be >= 2")
    if max_fps is not None and not max_fps > 0:
        raise ValueError(f"max_fps={max_fps} must be > 0")
    out_dir = Path(out_dir)
    summary = ShardSummary(out_dir, skipped=list(skipped or []))
    splits = list(dict.fromkeys(entry.split for entry in entries))
    for split in splits:
        _refuse_existing_shards(out_dir / split if split else out_dir, overwrite)
    writers = {split: _ShardWriter(out_dir / split if split else out_dir, maxcount, maxsize) for split in splits}
    try:
        for entry in tqdm(entries, desc="make-shards", unit="sample", disable=not progress):
            problem = _add_entry(writers[entry.split], entry, max_side, max_fps)
            if problem is not None:
                summary.skipped.append(problem)
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    for split, writer in writers.items():
        summary.shards[split], summary.samples[split] = writer.close()
    for reason, count in summary.skipped_by_reason().items():
        logger.info("skipped %d input(s): %s", count, reason)
    return summary


def _refuse_existing_shards(folder: Path, overwrite: bool) -> None:
    """Refuse before any work when ``folder`` holds shards and ``overwrite`` is not set; changes nothing."""
    existing = _existing_shard_files(folder)
    if existing and not overwrite:
        raise ConfigError(
            f"{str(folder)!r} already holds shards ({existing[0].name}, {len(existing)} file(s)); "
            f"pass --overwrite (overwrite=True) to replace them"
        )


def _existing_shard_files(folder: Path) -> list[Path]:
    existing = sorted(folder.glob("shard-*.tar")) + sorted(folder.glob("shard-*.tar.tmp"))
    if (folder / SIZES_FILE).exists():
        existing.append(folder / SIZES_FILE)
    return existing


def _add_entry(
    writer: _ShardWriter, entry: ListEntry, max_side: int | None, max_fps: float | None
) -> SkippedInput | None:
    extension = entry.media.suffix.lower().lstrip(".")
    if extension not in VIDEO_EXTENSIONS + IMAGE_EXTENSIONS:
        return SkippedInput("unsupported_extension", entry.where, str(entry.media))
    if not entry.media.is_file():
        return SkippedInput("missing", entry.where, str(entry.media))
    try:
        if extension in VIDEO_EXTENSIONS:
            media = _check_video(entry.media)
            if max_side is not None or max_fps is not None:
                reencoded = reencode_video(entry.media, max_side=max_side, max_fps=max_fps)
                if reencoded is not None:
                    extension, media = "mp4", reencoded
        else:
            media = _check_image(entry.media)
    except (_Unusable, ReencodeError) as problem:
        return SkippedInput("unreadable", entry.where, f"{entry.media}: {problem}")
    if len(entry.captions) == 1 and not entry.group:
        caption = ("txt", entry.captions[0].encode("utf-8"))
    else:
        payload = {"captions": entry.captions, **({"group": entry.group} if entry.group else {})}
        caption = ("json", json.dumps(payload, ensure_ascii=False).encode("utf-8"))
    writer.add(entry.key, [caption, (extension, media)])
    return None


class _Unusable(Exception):
    pass


def _check_video(path: Path) -> Path:
    try:
        if path.stat().st_size == 0:
            raise _Unusable("empty file")
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise _Unusable("no video stream")
    except _Unusable:
        raise
    except Exception as error:
        raise _Unusable(f"{type(error).__name__}: {error}") from None
    return path


def _check_image(path: Path) -> Path:
    try:
        if path.stat().st_size == 0:
            raise _Unusable("empty file")
        with Image.open(path, formats=IMAGE_FORMATS) as image:
            # the header parsed is enough to know PIL can read it; pixels are decoded at training time
            if min(image.size) < 1:
                raise _Unusable(f"image of size {image.size}")
    except _Unusable:
        raise
    except Exception as error:
        raise _Unusable(f"{type(error).__name__}: {error}") from None
    return path


class _ShardWriter:
    """Writes samples into numbered tar shards under a temporary name, renaming each when full."""

    def __init__(self, folder: Path, maxcount: int, maxsize: int):
        self.folder = folder
        self.maxcount = maxcount
        self.maxsize = maxsize
        self.sizes: dict[str, int] = {}
        self.paths: list[Path] = []
        self._tar: tarfile.TarFile | None = None
        self._temporary: Path | None = None
        self._count = 0
        self._bytes = 0

    def add(self, key: str, members: list[tuple[str, bytes | Path]]) -> None:
        lengths = [len(content) if isinstance(content, bytes) else content.stat().st_size for _, content in members]
        # one header block per member plus its data padded to whole blocks
        blocks = sum(1 + -(-length // tarfile.BLOCKSIZE) for length in lengths)
        sample_bytes = blocks * tarfile.BLOCKSIZE
        if self._tar is not None and (self._count >= self.maxcount or self._bytes + sample_bytes > self.maxsize):
            self._finish_shard()
        if self._tar is None:
            if not self.paths:
                self._clear_folder()
            self._temporary = self.folder / (SHARD_PATTERN % len(self.paths) + ".tmp")
            self._tar = tarfile.open(self._temporary, "w", format=tarfile.PAX_FORMAT)
        for (extension, content), length in zip(members, lengths):
            info = tarfile.TarInfo(f"{key}.{extension}")
            info.size, info.mtime, info.mode = length, 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if isinstance(content, bytes):
                self._tar.addfile(info, io.BytesIO(content))
            else:
                with content.open("rb") as handle:
                    self._tar.addfile(info, handle)
        self._count += 1
        self._bytes += sample_bytes

    def _finish_shard(self) -> None:
        assert self._tar is not None and self._temporary is not None
        self._tar.close()
        path = self._temporary.with_suffix("")
        os.replace(self._temporary, path)
        self.sizes[path.name] = self._count
        self.paths.append(path)
        self._tar, self._temporary, self._count, self._bytes = None, None, 0, 0

    def _clear_folder(self) -> None:
        # only once a sample is in hand: a list whose media are all missing leaves the folder as it was
        for path in _existing_shard_files(self.folder):
            path.unlink()
        self.folder.mkdir(parents=True, exist_ok=True)

    def close(self) -> tuple[list[Path], int]:
        if self._tar is not None:
            self._finish_shard()
        if not self.paths:
            return [], 0  # nothing written: no empty sizes.json that a retry would refuse to replace
        write_text_atomic(self.folder / SIZES_FILE, json.dumps(self.sizes, indent=1) + "\n")
        return list(self.paths), sum(self.sizes.values())

    def abort(self) -> None:
        if self._tar is not None:
            self._tar.close()
            assert self._temporary is not None
            self._temporary.unlink(missing_ok=True)
            self._tar = None
