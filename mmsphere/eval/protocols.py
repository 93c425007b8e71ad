"""Benchmark protocols of text-video retrieval: one registered, declarative definition per benchmark.

A protocol says which annotation files a benchmark reads and how (:mod:`mmsphere.eval.annotations`),
how captions group per video (``one``: one caption per video; ``all``: every caption is a t2v query
and all of a video's captions are its v2t ground truth; ``paragraph``: a video's captions joined by
spaces into one query, as CLIP4Clip does for DiDeMo and ActivityNet), where its media files lie under
``--media-root``, its default frames, the metrics and directions it reports, and the paper or
codebase that defines it. ``mmsphere eval-retrieval --protocol NAME`` runs one; ``mmsphere
protocols`` lists them. Your own::

    from mmsphere.eval.annotations import DelimitedColumns, FileRole
    from mmsphere.eval.protocols import RetrievalProtocol, register_protocol

    register_protocol(RetrievalProtocol(
        name="my-bench", version="1", description="my test split", source="my paper",
        files=(FileRole("captions", ("test.tsv",)),),
        reader=DelimitedColumns(video="clip", caption="text", delimiter="\\t"),
        grouping="all", media_names=("{id}.*",)))

and ``mmsphere eval-retrieval --imports my_module --protocol my-bench ...``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmsphere.errors import ConfigError, DataError
from mmsphere.eval.annotations import (
    ActivitynetJson,
    CaptionRow,
    DelimitedColumns,
    DidemoJson,
    FileRole,
    MsrvttJson,
    MsvdCaptions,
)
from mmsphere.registry import Registry
from mmsphere.user_modules import import_user_module

GROUPINGS = ("one", "all", "paragraph")
DIRECTIONS = ("t2v", "v2t")
METRICS = ("R@1", "R@5", "R@10", "MdR", "MnR")
FRAME_SAMPLING = ("uniform",)
# how every protocol samples frames (mmsphere.data.decode, exact decoding at evaluation)
UNIFORM_SAMPLING = "uniform: T frames at linspace(0, n-1, T) of the n decoded frames, exact decoding"


@dataclass(frozen=True)
class RetrievalProtocol:
    """A text-video retrieval benchmark as data: files, columns, caption grouping, media names, frames, source.

    ``media_names``: where a video id's file lies under the media root (searched recursively, as
    CLIP4Clip walks its video folder); templates tried in order, ``{id}`` the annotation's id,
    ``{stem}`` the id without a file extension, ``{bare}`` the id without ``id_prefix``; a name
    ending in ``.*`` matches any video extension.
    """

    name: str
    version: str
    description: str
    source: str
    files: tuple[FileRole, ...]
    reader: Callable[[Mapping[str, Path]], list[CaptionRow]]
    grouping: str
    media_names: tuple[str, ...] = ("{id}.*",)
    id_prefix: str = ""
    frames: int = 12
    frame_sampling: str = "uniform"
    directions: tuple[str, ...] = DIRECTIONS
    metrics: tuple[str, ...] = METRICS
    notes: str = ""
    expected: dict[str, int] = field(default_factory=dict)  # published set sizes: videos, captions

    def __post_init__(self) -> None:
        problems = []
        if not self.name or not all(part.isalnum() for part in self.name.split("-")):
            problems.append(f"name={self.name!r} must be letters and digits joined by '-'")
        if self.grouping not in GROUPINGS:
            problems.append(f"grouping={self.grouping!r} must be one of {', '.join(GROUPINGS)}")
        if self.frames < 1:
            problems.append(f"frames={self.frames} must be >= 1")
        if self.frame_sampling not in FRAME_SAMPLING:
            problems.append(f"frame_sampling={self.frame_sampling!r} must be one of {', '.join(FRAME_SAMPLING)}")
        if not self.files or not any(role.required for role in self.files):
            problems.append("files must name at least one required annotation file")
        if not self.media_names:
            problems.append("media_names must hold at least one template")
        for template in self.media_names:
            try:
                template.format(id="x", stem="x", bare="x")
            except (KeyError, IndexError, ValueError):
                problems.append(f"media_names template {template!r} may use only {{id}}, {{stem}} and {{bare}}")
        if not set(self.directions) <= set(DIRECTIONS) or not self.directions:
            problems.append(f"directions={self.directions!r} must be a subset of {DIRECTIONS}")
        if not set(self.metrics) <= set(METRICS) or not self.metrics:
            problems.append(f"metrics={self.metrics!r} must be a subset of {METRICS}")
        if not callable(self.reader):
            problems.append("reader must be callable: {role: path} -> [CaptionRow]")
        if problems:
            raise ValueError(f"protocol {self.name!r}: {'; '.join(problems)}")

    def describe_files(self) -> str:
        """The files it reads, for ``mmsphere protocols``."""
        return "; ".join(" or ".join(role.names) + ("" if role.required else " (optional)") for role in self.files)

    def describe(self) -> str:
        """The definition in words (``mmsphere protocols NAME``): files and format, grouping, media names, frames."""
        lines = [
            f"{self.name} (version {self.version}): {self.description}",
            f"  source: {self.source}",
            *(f"  file ({role.role}{'' if role.required else ', optional'}): {' or '.join(role.names)}"
              + (f" — {role.description}" if role.description else "") for role in self.files),
            f"  format: {describe_reader(self.reader)}",
            f"  captions per video: {self.grouping}",
            f"  media under --media-root (recursive): {', '.join(self.media_names)}"
            + (f" (bare = id without {self.id_prefix!r})" if self.id_prefix else ""),
            f"  frames: {self.frames}, {self.frame_sampling}",
            f"  reports: {', '.join(self.metrics)} for {', '.join(self.directions)}",
        ]
        if self.expected:
            sizes = ", ".join(f"{count:,} {what}" for what, count in self.expected.items())
            lines.append(f"  published size: {sizes}")
        if self.notes:
            lines.append(f"  note: {self.notes}")
        return "\n".join(lines)

    def summary(self) -> dict[str, Any]:
        """What a results card records of the protocol."""
        return {"name": self.name, "version": self.version, "description": self.description, "source": self.source,
                "grouping": self.grouping, "files": [list(role.names) for role in self.files],
                "format": describe_reader(self.reader), "directions": list(self.directions),
                "metrics": list(self.metrics), "frames": self.frames, "frame_sampling": UNIFORM_SAMPLING,
                "published_size": dict(self.expected)}


def describe_reader(reader: Any) -> str:
    """A reader's ``describe()``, else its name."""
    describe = getattr(reader, "describe", None)
    return describe() if callable(describe) else getattr(reader, "__name__", type(reader).__name__)


PROTOCOLS: Registry[RetrievalProtocol] = Registry("protocol", RetrievalProtocol,
                                                  listing_hint="mmsphere protocols lists them with their files")


def register_protocol(protocol: RetrievalProtocol) -> RetrievalProtocol:
    """Make ``protocol`` available as ``eval-retrieval --protocol <protocol.name>``."""
    return PROTOCOLS.register(getattr(protocol, "name", ""), protocol)


def get_protocol(name: str) -> RetrievalProtocol:
    """The registered protocol ``name``; an unknown name lists the known ones."""
    return PROTOCOLS.lookup(name)


def import_modules(modules: list[str]) -> None:
    """Import the modules that register a user's own protocols (``--imports``), also from the working directory."""
    for module in modules:
        try:
            import_user_module(module)
        except ImportError as error:
            raise ConfigError(f"--imports: cannot import {module!r} ({error})") from None


def find_annotation_files(protocol: RetrievalProtocol, location: str | Path) -> dict[str, Path]:
    """``{role: path}`` of a protocol's annotation files in folder ``location`` (or ``location`` itself, a file).

    A file given directly plays the protocol's first role; the other roles are looked up beside it.
    """
    location = Path(location)
    if not location.exists():
        raise DataError(f"annotations {str(location)!r} do not exist")
    folder = location.parent if location.is_file() else location
    found: dict[str, Path] = {}
    for index, role in enumerate(protocol.files):
        if index == 0 and location.is_file():
            found[role.role] = location
            continue
        path = next((folder / name for name in role.names if (folder / name).is_file()), None)
        if path is not None:
            found[role.role] = path
        elif role.required:
            pickled = [name for name in ("raw-captions.pkl",) if (folder / name).is_file()]
            hint = (f"; {pickled[0]} is a pickle, which mmsphere never loads (unpickling runs code): give the same "
                    f"captions as {' or '.join(role.names)}" if pickled and role.role == "captions" else "")
            raise DataError(f"protocol {protocol.name} needs {' or '.join(role.names)} in {str(folder)!r}"
                            f"{hint} (expected: {protocol.describe_files()})")
    return found


# --------------------------------------------------------------------------------------------
# the shipped protocols

CLIP4CLIP = "CLIP4Clip (Luo et al., Neurocomputing 2022), github.com/ArrowLuo/CLIP4Clip dataloaders"

register_protocol(RetrievalProtocol(
    name="msrvtt-1k-a",
    version="1",
    description="MSR-VTT 1k-A: the JSFusion test split of 1,000 videos, one caption each",
    source=f"JSFusion (Yu et al., ECCV 2018) split as used by {CLIP4CLIP}; the CLIP_benchmark MSR-VTT 1k-A task",
    files=(FileRole("captions", ("MSRVTT_JSFUSION_test.csv",),
                    description="key,vid_key,video_id,sentence"),),
    reader=DelimitedColumns(video="video_id", caption="sentence", delimiter=None),
    grouping="one",
    media_names=("{id}.mp4", "{id}.webm", "{id}.*"),
    frames=12,
    expected={"videos": 1000, "captions": 1000},
))

register_protocol(RetrievalProtocol(
    name="msrvtt-full",
    version="1",
    description="MSR-VTT full test split: all 20 captions of each of the 2,990 test videos",
    source="MSR-VTT (Xu et al., CVPR 2016) official split: train 0-6512, val 6513-7009, test 7010-9999",
    files=(FileRole("annotations", ("MSRVTT_data.json", "test_videodatainfo.json"),
                    description='{"sentences": [{"video_id", "caption"}]}'),),
    reader=MsrvttJson(first=7010, last=9999),
    grouping="all",
    media_names=("{id}.mp4", "{id}.webm", "{id}.*"),
    frames=12,
    expected={"videos": 2990, "captions": 59800},
))

register_protocol(RetrievalProtocol(
    name="msvd",
    version="1",
    description="MSVD test split: 670 videos with all of their captions",
    source=f"MSVD (Chen & Dolan, ACL 2011), split of Venugopalan et al. 2015 as used by {CLIP4CLIP}",
    files=(FileRole("split", ("test_list.txt",), description="video ids, one per line"),
           FileRole("captions", ("AllVideoDescriptions.txt", "raw-captions.json"),
                    description="'VIDEO_ID caption' lines, or JSON {VIDEO_ID: [captions]}")),
    reader=MsvdCaptions(),
    grouping="all",
    media_names=("{id}.*",),
    frames=12,
    notes=("CLIP4Clip reads the captions from raw-captions.pkl, a pickle, which mmsphere never loads: "
           "AllVideoDescriptions.txt holds the same captions untokenised, so tokenisation may differ slightly"),
    expected={"videos": 670},
))

register_protocol(RetrievalProtocol(
    name="didemo",
    version="1",
    description="DiDeMo test split, paragraph-to-video: a video's descriptions joined into one query",
    source=f"DiDeMo (Hendricks et al., ICCV 2017), paragraph-to-video retrieval as in {CLIP4CLIP}",
    files=(FileRole("annotations", ("test_data.json",), description="[{video, times, description}]"),
           FileRole("split", ("test_list.txt",), required=False, description="video names, one per line")),
    reader=DidemoJson(),
    grouping="paragraph",
    media_names=("{id}", "{id}.*", "{stem}.*"),
    frames=64,
    notes="CLIP4Clip uses 64 frames and 64 text tokens for paragraphs; the text tower's context length applies here",
    expected={"videos": 1004},
))

register_protocol(RetrievalProtocol(
    name="activitynet",
    version="1",
    description="ActivityNet Captions val_1 as test, paragraph-to-video: a video's sentences joined into one query",
    source=f"ActivityNet Captions (Krishna et al., ICCV 2017), val_1 as the test set as in {CLIP4CLIP}",
    files=(FileRole("annotations", ("val_1.json",), description='{"v_ID": {"sentences": [...], ...}}'),),
    reader=ActivitynetJson(),
    grouping="paragraph",
    media_names=("{id}.*", "{bare}.*"),
    id_prefix="v_",
    frames=64,
    notes="CLIP4Clip names the videos without the v_ prefix; both names are found",
    expected={"videos": 4917},
))

register_protocol(RetrievalProtocol(
    name="lsmdc",
    version="1",
    description="LSMDC 2016 challenge test: 1,000 movie clips, one caption each",
    source=f"LSMDC (Rohrbach et al., IJCV 2017), the 1,000-clip public test list as used by {CLIP4CLIP}",
    files=(FileRole("captions", ("LSMDC16_challenge_1000_publictect.csv",),
                    description="tab-separated, no header: clip id, start/end aligned, start/end extracted, "
                                "sentence"),),
    reader=DelimitedColumns(video="clip_id", caption="sentence", delimiter="\t",
                            header=("clip_id", "start_aligned", "end_aligned", "start_extracted", "end_extracted",
                                    "sentence")),
    grouping="one",
    media_names=("{id}.*",),
    frames=12,
    notes="the videos need MPII's permission; clips are found by name anywhere under the media root",
    expected={"videos": 1000, "captions": 1000},
))
