"""Sample lists: a CSV, JSONL or MSR-VTT 1k-A list of media files and captions -> entries, one per sample.

Formats (relative media paths resolve against ``media_root`` if given, else the list's folder):

* JSONL: one object per line with a media path under ``path`` (or ``media``, ``video``, ``image``,
  ``file``), ``caption`` (string) or ``captions`` (list of strings), optional ``key``, ``split``
  and ``group``;
* CSV (``,``, ``;`` or tab separated, with a header): the same columns, ``captions`` as a JSON list;
* the MSR-VTT 1k-A CSV of CLIP4Clip (``key,vid_key,video_id,sentence``, also ``;``-separated):
  recognised by its ``video_id`` and ``sentence`` columns, videos at ``MEDIA_ROOT/<video_id>.mp4``,
  rows of the same video merged into one sample with several captions.

Lines that cannot be used come back as :class:`SkippedInput` with a reason; whether the media
files exist and decode is checked by their consumers (the shard builder, the evaluation list loader).
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from mmsphere.config import MmsphereError

MEDIA_COLUMNS = ("path", "media", "video", "image", "file")
CAPTION_COLUMNS = ("caption", "captions")
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
    fields: set[str] = set()
    for where, row in rows:
        if isinstance(row, SkippedInput):
            skipped.append(row)
            continue
        fields.update(row)
        entry = _entry_from_row(row, base, where)
        if isinstance(entry, SkippedInput):
            skipped.append(entry)
        elif entry.key in keys:
            skipped.append(SkippedInput("duplicate_key", where, f"key {entry.key!r} already used at {keys[entry.key]}"))
        else:
            keys[entry.key] = where
            entries.append(entry)
    if suffix in (".jsonl", ".json") and fields:
        # a CSV's header is checked before its rows are read; a JSONL list has none: the fields of all its lines
        _require_columns(path, sorted(fields), "on any line")
    return entries, skipped


def _require_columns(path: Path, columns: list[str], scope: str) -> None:
    """Stop with the column that is absent, rather than skip every line for lacking it."""
    found = f"(found: {', '.join(columns) or 'nothing'})"
    if not any(name in columns for name in MEDIA_COLUMNS):
        raise MmsphereError(f"sample list {str(path)!r} has no media column {scope}: expected one of "
                            f"{', '.join(MEDIA_COLUMNS)} {found}")
    if not any(name in columns for name in CAPTION_COLUMNS):
        raise MmsphereError(f"sample list {str(path)!r} has no caption column {scope}: expected caption (one text) "
                            f"or captions (a JSON list of texts) {found}")


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
    _require_columns(path, columns, "in its header")
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
