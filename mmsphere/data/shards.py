"""The shard builder: a CSV or JSONL list of media files and captions -> webdataset tar shards.

List formats (relative media paths resolve against ``media_root`` if given, else the list's folder):

* JSONL: one object per line with a media path under ``path`` (or ``media``, ``video``, ``image``,
  ``file``), ``caption`` (string) or ``captions`` (list of strings), optional ``key`` and ``split``;
* CSV (``,``, ``;`` or tab separated, with a header): the same columns, ``captions`` as a JSON list;
* the MSR-VTT 1k-A CSV of CLIP4Clip (``key,vid_key,video_id,sentence``, also ``;``-separated):
  recognised by its ``video_id`` and ``sentence`` columns, videos at ``MEDIA_ROOT/<video_id>.mp4``,
  rows of the same video merged into one sample with several captions.

Output: ``OUT/shard-000000.tar``, ... and ``OUT/sizes.json`` (shard file name -> samples), or one
such folder per ``split`` value (``OUT/<split>/``). A sample is ``KEY.<ext>`` holding the media
bytes exactly as they were (unless re-encoding is asked for) plus ``KEY.txt`` (one caption) or
``KEY.json`` (``{"captions": [...]}``). Shards are written under a temporary name and renamed,
with fixed tar metadata, so the same list gives byte-identical shards.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import tarfile
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
from PIL import Image
from tqdm import tqdm

from mmsphere.config import MmsphereError
from mmsphere.data.decode import IMAGE_FORMATS
from mmsphere.data.samples import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS

logger = logging.getLogger(__name__)

MEDIA_COLUMNS = ("path", "media", "video", "image", "file")
SHARD_PATTERN = "shard-%06d.tar"
SIZES_FILE = "sizes.json"
DEFAULT_MAXCOUNT = 1000
DEFAULT_MAXSIZE = 1 << 30

# Why an input line did not become a sample.
INPUT_SKIP_REASONS = {
    "missing": "the media file does not exist",
    "unreadable": "the media file cannot be read or is not a decodable image/video",
    "unsupported_extension": f"the media extension is not one of {', '.join(VIDEO_EXTENSIONS + IMAGE_EXTENSIONS)}",
    "no_caption": "the line has no non-empty caption",
    "bad_line": "the line cannot be parsed or lacks the media path",
    "duplicate_key": "the key was already used by an earlier line",
}
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_\-]+(/[A-Za-z0-9_\-]+)*$")


@dataclass
class ListEntry:
    """One sample to write: its key, media file, captions and (optional) split."""

    key: str
    media: Path
    captions: list[str]
    split: str = ""
    where: str = ""  # "list.csv:12", for messages
    group: str = ""  # samples sharing a group are positives of each other (loss.positives: group)


@dataclass
class SkippedInput:
    """An input line or file left out, and why."""

    reason: str
    where: str
    detail: str = ""


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
# reading lists


def read_sample_list(
    path: str | Path, *, media_root: str | Path | None = None
) -> tuple[list[ListEntry], list[SkippedInput]]:
    """Parse a CSV/JSONL/MSR-VTT list into entries; lines that cannot be used are returned as skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sample list {str(path)!r} does not exist")
    if media_root is not None and not Path(media_root).is_dir():
        raise FileNotFoundError(f"media root {str(media_root)!r} is not a directory")
    base = Path(media_root) if media_root is not None else path.parent
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise MmsphereError(f"sample list {str(path)!r} is not UTF-8 text: {error}") from None
    if suffix in (".jsonl", ".json"):
        rows = _jsonl_rows(text, path)
    elif suffix in (".csv", ".tsv"):
        rows = _csv_rows(text, path, media_root)
    else:
        raise MmsphereError(f"sample list {str(path)!r}: unknown format {suffix!r}; use .csv, .tsv or .jsonl")
    entries: list[ListEntry] = []
    skipped: list[SkippedInput] = []
    keys: dict[str, str] = {}
    for where, row in rows:
        if isinstance(row, SkippedInput):
            skipped.append(row)
            continue
        entry = _entry_from_row(row, base, where)
        if isinstance(entry, SkippedInput):
            skipped.append(entry)
        elif entry.key in keys:
            skipped.append(SkippedInput("duplicate_key", where, f"key {entry.key!r} already used at {keys[entry.key]}"))
        else:
            keys[entry.key] = where
            entries.append(entry)
    return entries, skipped


def _jsonl_rows(text: str, path: Path) -> Iterable[tuple[str, dict | SkippedInput]]:
    for number, line in enumerate(text.splitlines(), start=1):
        where = f"{path.name}:{number}"
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            yield where, SkippedInput("bad_line", where, f"not JSON: {error}")
            continue
        if not isinstance(row, dict):
            yield where, SkippedInput("bad_line", where, "not a JSON object")
            continue
        yield where, row


def _csv_rows(text: str, path: Path, media_root: str | Path | None) -> Iterable[tuple[str, dict | SkippedInput]]:
    lines = text.splitlines()
    if not lines:
        raise MmsphereError(f"sample list {str(path)!r} is empty")
    header = lines[0]
    delimiter = max(",;\t", key=header.count) if any(mark in header for mark in ",;\t") else ","
    reader = csv.DictReader(io.StringIO(text), delimiter=delimiter)
    columns = [name.strip() for name in reader.fieldnames or []]
    reader.fieldnames = columns
    msrvtt = "video_id" in columns and "sentence" in columns
    if msrvtt:
        if media_root is None:
            raise MmsphereError(
                f"{str(path)!r} is an MSR-VTT list (video_id, sentence): pass --media-root, the folder "
                f"holding video*.mp4"
            )
        yield from _msrvtt_rows(reader, path)
        return
    if not any(name in columns for name in MEDIA_COLUMNS):
        raise MmsphereError(
            f"sample list {str(path)!r} has no media column: expected one of {', '.join(MEDIA_COLUMNS)} "
            f"(found: {', '.join(columns) or 'nothing'})"
        )
    for number, row in enumerate(reader, start=2):
        where = f"{path.name}:{number}"
        if "captions" in row and row["captions"]:
            try:
                row["captions"] = json.loads(row["captions"])
            except json.JSONDecodeError:
                yield where, SkippedInput("bad_line", where, "the captions column must be a JSON list of strings")
                continue
        yield where, row


def _msrvtt_rows(reader: csv.DictReader, path: Path) -> Iterable[tuple[str, dict]]:
    videos: dict[str, dict] = {}
    for number, row in enumerate(reader, start=2):
        video_id = (row.get("video_id") or "").strip()
        where = f"{path.name}:{number}"
        if not video_id:
            continue
        item = videos.setdefault(
            video_id, {"key": video_id, "path": f"{video_id}.mp4", "captions": [], "where": where}
        )
        item["captions"].append(row.get("sentence") or "")
    for item in videos.values():
        yield item.pop("where"), item


def _entry_from_row(row: dict, base: Path, where: str) -> ListEntry | SkippedInput:
    media_value = next((row[name] for name in MEDIA_COLUMNS if row.get(name)), None)
    if not isinstance(media_value, str) or not media_value.strip():
        return SkippedInput("bad_line", where, f"no media path (columns {', '.join(MEDIA_COLUMNS)})")
    captions = row.get("captions")
    if captions is None or captions == "":
        captions = [row.get("caption")] if row.get("caption") is not None else []
    if not isinstance(captions, list) or not all(isinstance(caption, str) for caption in captions):
        return SkippedInput("bad_line", where, "captions must be a list of strings and caption a string")
    captions = [caption.strip() for caption in captions if caption.strip()]
    if not captions:
        return SkippedInput("no_caption", where)
    media = Path(media_value.strip()).expanduser()
    if not media.is_absolute():
        media = base / media
    key = str(row.get("key") or "").strip() or media.stem
    split = str(row.get("split") or "").strip()
    if split and not _SPLIT_NAME.match(split):
        return SkippedInput("bad_line", where, f"split {split!r} must be letters, digits, '_', '-' (and '/')")
    group = row.get("group")
    if group is not None and not isinstance(group, (str, int)):
        return SkippedInput("bad_line", where, "group must be a string or an integer")
    # webdataset's key ends at the first dot of the member name
    return ListEntry(re.sub(r"[^A-Za-z0-9_\-]", "_", key), media, captions, split, where,
                     "" if group is None else str(group).strip())


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
        _prepare_folder(out_dir / split if split else out_dir, overwrite)
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


def _prepare_folder(folder: Path, overwrite: bool) -> None:
    existing = sorted(folder.glob("shard-*.tar")) + sorted(folder.glob("shard-*.tar.tmp"))
    if (folder / SIZES_FILE).exists():
        existing.append(folder / SIZES_FILE)
    if existing and not overwrite:
        raise FileExistsError(
            f"{str(folder)!r} already holds shards ({existing[0].name}, {len(existing)} file(s)); "
            f"pass --overwrite (overwrite=True) to replace them"
        )
    for path in existing:
        path.unlink()
    folder.mkdir(parents=True, exist_ok=True)


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
    except _Unusable as problem:
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


def reencode_video(path: str | Path, *, max_side: int | None = None, max_fps: float | None = None) -> bytes | None:
    """H.264 re-encode of a video whose longer side exceeds ``max_side`` or frame rate exceeds ``max_fps``.

    Returns the new MP4 bytes (video only, CRF 23), or None when the video is within both limits.
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
                encoder.options = {"crf": "23", "preset": "veryfast"}
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
        raise _Unusable(f"re-encoding failed: {type(error).__name__}: {error}") from None


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

    def close(self) -> tuple[list[Path], int]:
        if self._tar is not None:
            self._finish_shard()
        temporary = self.folder / (SIZES_FILE + ".tmp")
        temporary.write_text(json.dumps(self.sizes, indent=1) + "\n")
        os.replace(temporary, self.folder / SIZES_FILE)
        return list(self.paths), sum(self.sizes.values())

    def abort(self) -> None:
        if self._tar is not None:
            self._tar.close()
            assert self._temporary is not None
            self._temporary.unlink(missing_ok=True)
            self._tar = None
