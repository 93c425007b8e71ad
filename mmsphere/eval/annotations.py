"""Readers of the benchmarks' own annotation files: each gives (video id, caption) rows in file order.

A reader is a small frozen dataclass whose fields say which files and columns it reads, so a
protocol definition (:mod:`mmsphere.eval.protocols`) is data and ``mmsphere protocols`` can print
it. Readers only parse text and JSON: nothing here unpickles (CLIP4Clip ships MSVD's captions as
``raw-captions.pkl``, a pickle; the MSVD reader takes the same captions in text form instead).

The formats follow the data loaders of CLIP4Clip (Luo et al. 2022, github.com/ArrowLuo/CLIP4Clip,
``dataloaders/dataloader_*_retrieval.py``), the codebase most video-text papers evaluate with.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmsphere.errors import DataError


@dataclass(frozen=True)
class CaptionRow:
    """One caption of one video, and where in which file it was read (``file.csv:12``)."""

    video: str
    caption: str
    where: str


@dataclass(frozen=True)
class FileRole:
    """A file a protocol reads: its role, the names it goes by (first found wins) and whether it is needed."""

    role: str
    names: tuple[str, ...]
    required: bool = True
    description: str = ""


def read_text(path: Path) -> str:
    """UTF-8 text of an annotation file (a BOM is dropped); a missing or binary file is a DataError."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"annotation file {str(path)!r} does not exist") from None
    except UnicodeDecodeError as error:
        raise DataError(f"annotation file {str(path)!r} is not UTF-8 text ({error})") from None


def read_json(path: Path) -> Any:
    """The JSON value of an annotation file; a syntax error names the file and line."""
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as error:
        raise DataError(f"annotation file {str(path)!r} is not valid JSON: {error}") from None


def _caption(text: Any, where: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where}: the caption is empty or not a string ({text!r})")
    return text.strip()


@dataclass(frozen=True)
class DelimitedColumns:
    """A delimited text file; ``video`` and ``caption`` name the columns holding the video id and the caption.

    ``header=None``: the first line names the columns (``delimiter=None`` picks ``,``, ``;`` or tab
    from it). Otherwise the file has no header and ``header`` names its columns in order; every line
    must have exactly that many fields.
    """

    video: str
    caption: str
    delimiter: str | None = ","
    header: tuple[str, ...] | None = None
    role: str = "captions"

    def describe(self) -> str:
        """The format in words, for ``mmsphere protocols`` and the README."""
        separator = {",": "comma", "\t": "tab", ";": "semicolon", None: "comma/semicolon/tab"}[self.delimiter]
        layout = (f"{separator}-separated with a header" if self.header is None
                  else f"{separator}-separated, no header, columns {', '.join(self.header)}")
        return f"{layout}; video id = {self.video}, caption = {self.caption}"

    def __call__(self, files: Mapping[str, Path]) -> list[CaptionRow]:
        path = files[self.role]
        text = read_text(path)
        lines = text.splitlines()
        if not any(line.strip() for line in lines):
            raise DataError(f"annotation file {str(path)!r} is empty")
        if self.header is None:
            delimiter = self.delimiter or max(",;\t", key=lines[0].count)
            reader = csv.reader(io.StringIO(text), delimiter=delimiter)
            columns = [name.strip() for name in next(reader)]
            first_line = 2
        else:
            # a headerless file's last field may hold the delimiter's quote character: read it verbatim
            reader = csv.reader(io.StringIO(text), delimiter=self.delimiter or ",", quoting=csv.QUOTE_NONE)
            columns, first_line = list(self.header), 1
        for needed in (self.video, self.caption):
            if needed not in columns:
                raise DataError(f"annotation file {str(path)!r} has no column {needed!r} "
                                f"(columns: {', '.join(columns) or 'none'})")
        video_index, caption_index = columns.index(self.video), columns.index(self.caption)
        rows = []
        for number, fields in enumerate(reader, start=first_line):
            where = f"{path.name}:{number}"
            if not fields or not any(field.strip() for field in fields):
                continue
            if self.header is not None and len(fields) != len(columns):
                raise DataError(f"{where} has {len(fields)} fields, expected {len(columns)} "
                                f"({', '.join(columns)})")
            if len(fields) <= max(video_index, caption_index):
                raise DataError(f"{where} has {len(fields)} fields; {self.video!r} and {self.caption!r} "
                                f"are columns {video_index + 1} and {caption_index + 1}")
            video = fields[video_index].strip()
            if not video:
                raise DataError(f"{where}: the {self.video!r} column is empty")
            rows.append(CaptionRow(video, _caption(fields[caption_index], where), where))
        return rows


@dataclass(frozen=True)
class MsrvttJson:
    """MSR-VTT's train_val/test annotation JSON: ``{"sentences": [{"video_id", "caption"}, ...]}``.

    The test split is the videos numbered ``first``..``last`` (video7010-video9999 in the official
    split); videos come in numeric order, each with its captions in file order.
    """

    first: int = 7010
    last: int = 9999
    role: str = "annotations"

    def describe(self) -> str:
        """The format in words."""
        return (f'JSON with "sentences": [{{"video_id", "caption"}}, ...]; the videos video{self.first}-'
                f"video{self.last}, all of their captions")

    def __call__(self, files: Mapping[str, Path]) -> list[CaptionRow]:
        path = files[self.role]
        data = read_json(path)
        sentences = data.get("sentences") if isinstance(data, dict) else None
        if not isinstance(sentences, list):
            raise DataError(f"annotation file {str(path)!r} has no \"sentences\" list (is it MSRVTT_data.json?)")
        rows = []
        for index, item in enumerate(sentences):
            where = f"{path.name}:sentences[{index}]"
            if not isinstance(item, dict) or not isinstance(item.get("video_id"), str):
                raise DataError(f"{where} must be an object with a string \"video_id\"")
            match = re.fullmatch(r"video(\d+)", item["video_id"])
            if match and self.first <= int(match.group(1)) <= self.last:
                rows.append(CaptionRow(item["video_id"], _caption(item.get("caption"), where), where))
        if not rows:
            raise DataError(f"annotation file {str(path)!r} holds no caption of video{self.first}-video{self.last}")
        # a stable sort keeps each video's captions in file order
        return sorted(rows, key=lambda row: int(row.video.removeprefix("video")))


@dataclass(frozen=True)
class VideoList:
    """A split file of video ids, one per line (CLIP4Clip's ``test_list.txt``)."""

    role: str = "split"

    def __call__(self, path: Path) -> list[str]:
        ids = [line.strip() for line in read_text(path).splitlines() if line.strip()]
        if not ids:
            raise DataError(f"split file {str(path)!r} is empty")
        return list(dict.fromkeys(ids))


@dataclass(frozen=True)
class MsvdCaptions:
    """MSVD's test split (``test_list.txt``) with every caption of each video, in a text form.

    Captions come from ``AllVideoDescriptions.txt`` (the MSVD release's text form: ``VIDEO_ID caption``
    per line, ``#`` comments) or a JSON ``{"VIDEO_ID": ["caption", ...]}`` (a caption may be a list
    of tokens, joined by spaces as CLIP4Clip does with ``raw-captions.pkl``'s tokens).
    """

    role: str = "captions"
    split_role: str = "split"

    def describe(self) -> str:
        """The format in words."""
        return ("video ids one per line (test_list.txt) + 'VIDEO_ID caption' lines (AllVideoDescriptions.txt) "
                'or JSON {"VIDEO_ID": [captions]}; every caption of each listed video')

    def __call__(self, files: Mapping[str, Path]) -> list[CaptionRow]:
        videos = VideoList(self.split_role)(files[self.split_role])
        path = files[self.role]
        captions = self._json(path) if path.suffix.lower() == ".json" else self._text(path)
        rows = []
        for video in videos:
            if video not in captions:
                raise DataError(f"{files[self.split_role].name} lists {video!r}, which has no caption in "
                                f"{str(path)!r}")
            rows.extend(captions[video])
        return rows

    @staticmethod
    def _text(path: Path) -> dict[str, list[CaptionRow]]:
        captions: dict[str, list[CaptionRow]] = {}
        for number, line in enumerate(read_text(path).splitlines(), start=1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            where = f"{path.name}:{number}"
            video, _, caption = line.strip().partition(" ")
            captions.setdefault(video, []).append(CaptionRow(video, _caption(caption, where), where))
        return captions

    @staticmethod
    def _json(path: Path) -> dict[str, list[CaptionRow]]:
        data = read_json(path)
        if not isinstance(data, dict):
            raise DataError(f"annotation file {str(path)!r} must hold an object {{video id: [captions]}}")
        captions: dict[str, list[CaptionRow]] = {}
        for video, items in data.items():
            if not isinstance(items, list):
                raise DataError(f"{path.name}:{video} must be a list of captions")
            rows = []
            for index, item in enumerate(items):
                where = f"{path.name}:{video}[{index}]"
                text = " ".join(item) if isinstance(item, list) and all(isinstance(t, str) for t in item) else item
                rows.append(CaptionRow(video, _caption(text, where), where))
            captions[video] = rows
        return captions


@dataclass(frozen=True)
class DidemoJson:
    """DiDeMo's ``test_data.json``: a list of ``{"video", "times", "description"}``, one per moment.

    With a split file (``test_list.txt``) only its videos are kept, in its order, as CLIP4Clip does.
    """

    role: str = "annotations"
    split_role: str = "split"

    def describe(self) -> str:
        """The format in words."""
        return ('JSON list of {"video", "times", "description"}; a video\'s descriptions in file order '
                "(test_list.txt, when present, selects and orders the videos)")

    def __call__(self, files: Mapping[str, Path]) -> list[CaptionRow]:
        path = files[self.role]
        data = read_json(path)
        if not isinstance(data, list):
            raise DataError(f"annotation file {str(path)!r} must hold a list of {{video, times, description}}")
        rows = []
        for index, item in enumerate(data):
            where = f"{path.name}[{index}]"
            if not isinstance(item, dict) or not isinstance(item.get("video"), str) or not item["video"].strip():
                raise DataError(f"{where} must be an object with a string \"video\"")
            rows.append(CaptionRow(item["video"].strip(), _caption(item.get("description"), where), where))
        if self.split_role in files:
            order = {video: rank for rank, video in enumerate(VideoList(self.split_role)(files[self.split_role]))}
            rows = sorted((row for row in rows if row.video in order), key=lambda row: order[row.video])
        return rows


@dataclass(frozen=True)
class ActivitynetJson:
    """ActivityNet Captions' ``val_1.json``: ``{"v_ID": {"sentences": [...], "timestamps", "duration"}}``."""

    role: str = "annotations"

    def describe(self) -> str:
        """The format in words."""
        return 'JSON {"v_ID": {"sentences": [...], "timestamps": [...], "duration": s}}; a video\'s sentences in order'

    def __call__(self, files: Mapping[str, Path]) -> list[CaptionRow]:
        path = files[self.role]
        data = read_json(path)
        if not isinstance(data, dict):
            raise DataError(f"annotation file {str(path)!r} must hold an object {{video id: {{sentences: [...]}}}}")
        rows = []
        for video, item in data.items():
            sentences = item.get("sentences") if isinstance(item, dict) else None
            if not isinstance(sentences, list) or not sentences:
                raise DataError(f"{path.name}:{video} must be an object with a non-empty \"sentences\" list")
            rows.extend(CaptionRow(video, _caption(sentence, f"{path.name}:{video}.sentences[{index}]"),
                                   f"{path.name}:{video}.sentences[{index}]")
                        for index, sentence in enumerate(sentences))
        return rows
