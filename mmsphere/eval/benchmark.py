"""Benchmark runs: a protocol's (or a list's) items resolved to media files, checked, encoded and scored.

Two steps, so that a missing file stops the run in a second, before any model is loaded::

    evaluation_set = protocol_set("msrvtt-1k-a", media_root="videos/", annotations="msrvtt_data/")
    results = evaluate_set(model, evaluation_set)        # refuses an incomplete set unless allow_missing

``results`` is the retrieval results dict of :func:`mmsphere.eval.evaluate_retrieval` with the
protocol, the list files' digests, the media fingerprint and n listed / n evaluated added.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmsphere.data.sample_list import ListEntry, read_sample_list
from mmsphere.data.modalities import MODALITY_REGISTRY
from mmsphere.digest import file_sha256
from mmsphere.errors import ConfigError, DataError, MmsphereError
from mmsphere.eval.annotations import CaptionRow
from mmsphere.eval.completeness import (
    MediaIndex,
    MissingItem,
    check_file,
    completeness,
    media_fingerprint,
    refuse_incomplete,
)
from mmsphere.eval.encode import encode_eval_set
from mmsphere.eval.evaluate import evaluate_retrieval
from mmsphere.eval.media_list import MediaListLoader
from mmsphere.eval.protocols import UNIFORM_SAMPLING, RetrievalProtocol, find_annotation_files, get_protocol

DEFAULT_FRAMES = 12


@dataclass
class EvaluationSet:
    """The items a protocol or list names, resolved to media files before anything is encoded."""

    name: str  # the protocol's name, or "list"
    what: str  # the items in words, for messages: "videos of protocol msrvtt-1k-a under 'videos'"
    entries: list[ListEntry]  # the items found, each with its (grouped) captions
    missing: list[MissingItem]  # the items not found or not readable
    listed: int  # items listed
    captions_listed: int
    frames: int  # the default frames per video
    media_root: Path | None
    identity: dict[str, Any] = field(default_factory=dict)  # the list files and their digests
    protocol: dict[str, Any] = field(default_factory=dict)  # what the card records of the protocol


def protocol_set(protocol: str | RetrievalProtocol, media_root: str | os.PathLike,
                 annotations: str | os.PathLike | None = None) -> EvaluationSet:
    """A protocol's videos and captions from its annotation files (in ``annotations``, default the media root)."""
    if isinstance(protocol, str):
        protocol = get_protocol(protocol)
    index = MediaIndex(media_root)
    files = find_annotation_files(protocol, annotations if annotations is not None else media_root)
    videos = group_captions(protocol.reader(files), protocol.grouping, protocol.name)
    if not videos:
        raise DataError(f"protocol {protocol.name}: the annotation files list no video "
                        f"({', '.join(str(path) for path in files.values())})")
    entries, missing = [], []
    for video, (captions, where) in videos.items():
        names = media_names(protocol, video)
        path = index.find(names)
        problem = (MissingItem(video, "missing", f"no {' / '.join(names)} under {str(index.root)!r}") if path is None
                   else check_file(path, video))
        if problem is None:
            entries.append(ListEntry(video, path, captions, where=where))
        else:
            missing.append(problem)
    digests = {role: {"file": str(path.resolve()), "sha256": file_sha256(path)} for role, path in files.items()}
    return EvaluationSet(
        name=protocol.name,
        what=f"videos of protocol {protocol.name} under {str(media_root)!r}",
        entries=entries, missing=missing, listed=len(videos),
        captions_listed=sum(len(captions) for captions, _ in videos.values()),
        frames=protocol.frames, media_root=Path(media_root),
        identity={"annotations": digests, "list_sha256": combined_digest(digests)},
        protocol=protocol.summary(),
    )


def list_set(list_file: str | os.PathLike, media_root: str | os.PathLike | None = None) -> EvaluationSet:
    """The samples of a CSV/JSONL list (or an MSR-VTT 1k-A CSV) and their media files."""
    if not Path(list_file).is_file():
        raise DataError(f"--list {str(list_file)!r} does not exist")
    try:
        rows, skipped = read_sample_list(list_file, media_root=media_root)
    except FileNotFoundError as error:
        raise DataError(str(error)) from None
    missing = [MissingItem(item.where, item.reason, item.detail) for item in skipped]
    entries = []
    for entry in rows:
        problem = check_file(Path(entry.media), entry.key)
        if problem is None:
            entries.append(entry)
        else:
            missing.append(problem)
    digest = file_sha256(list_file)
    return EvaluationSet(
        name="list", what=f"samples of {str(list_file)!r}", entries=entries, missing=missing,
        listed=len(rows) + len(skipped), captions_listed=sum(len(entry.captions) for entry in rows),
        frames=DEFAULT_FRAMES, media_root=Path(media_root) if media_root is not None else None,
        identity={"list": str(Path(list_file).resolve()), "list_sha256": digest},
        protocol={"name": "list", "version": None, "description": "a CSV/JSONL list of media and captions",
                  "grouping": "all", "frame_sampling": UNIFORM_SAMPLING},
    )


def evaluate_set(
    model: torch.nn.Module,
    evaluation_set: EvaluationSet,
    *,
    frames: int | None = None,
    modality: str = "video",
    batch_size: int = 16,
    workers: int = 0,
    allow_missing: bool = False,
    missing_file: str | os.PathLike | None = None,
    progress: bool = True,
    **scoring: Any,
) -> dict[str, Any]:
    """Encode and score an evaluation set; an incomplete one is refused unless ``allow_missing``.

    Missing files stop it before encoding, files that do not decode before scoring.
    ``missing_file`` receives the names of the items left out (when there are any). ``scoring``:
    ``dsl``, ``dsl_temperature``, ``chunk_size``, ``save_sim`` of :func:`evaluate_retrieval`.
    """
    frames = evaluation_set.frames if frames is None else frames
    if frames < 1:
        raise ConfigError(f"frames={frames} must be >= 1")
    refuse_incomplete(evaluation_set.missing, evaluation_set.listed, evaluation_set.what,
                      allow_missing=allow_missing, missing_file=missing_file)
    if not evaluation_set.entries:
        raise DataError(f"none of the {evaluation_set.listed} {evaluation_set.what} was found; nothing to evaluate")
    loader = MediaListLoader(evaluation_set.entries, modality=modality, frames=frames, image_size=model.image_size,
                             image_mean=model.image_mean, image_std=model.image_std, batch_size=batch_size,
                             workers=workers)
    try:
        encoded = encode_eval_set(model, loader, progress=progress)
    except MmsphereError:
        if not loader.failed:
            raise
        encoded = None
    missing = [*evaluation_set.missing, *loader.failed]
    refuse_incomplete(missing, evaluation_set.listed, evaluation_set.what, allow_missing=allow_missing,
                      missing_file=missing_file, stage="before scoring (found while decoding)")
    if encoded is None:
        raise DataError(f"none of the {evaluation_set.listed} {evaluation_set.what} decodes; nothing to evaluate")
    results = evaluate_retrieval(model, encoded, **scoring)
    results["metrics"] = reported(results["metrics"], evaluation_set.protocol)
    evaluated = set(encoded.keys)
    used = [(entry.key, Path(entry.media)) for entry in evaluation_set.entries if entry.key in evaluated]
    results["data"].update(
        skipped=dict(Counter(item.reason for item in loader.failed)),
        **evaluation_set.identity,
        media_root=str(evaluation_set.media_root.resolve()) if evaluation_set.media_root is not None else None,
        media=media_fingerprint(used, evaluation_set.media_root),
        captions_listed=evaluation_set.captions_listed,
        frames=MODALITY_REGISTRY[modality].clip_length(frames),
        frame_sampling=UNIFORM_SAMPLING if MODALITY_REGISTRY[modality].temporal else "one image",
        **completeness(evaluation_set.listed, len(encoded.keys), missing, missing_file),
    )
    results["protocol"] = evaluation_set.protocol
    return results


def evaluate_shards(model: torch.nn.Module, urls: str, *, frames: int = DEFAULT_FRAMES, modality: str = "video",
                    **options: Any) -> dict[str, Any]:
    """Retrieval results of webdataset shards, recorded as a card records them (the URLs, frames, "shards").

    ``options``: the rest of :func:`evaluate_retrieval`'s keywords (batch size, workers, DSL, ...).
    """
    results = evaluate_retrieval(model, urls, modality=modality, frames=frames, **options)
    results["data"].update(urls=urls, frames=MODALITY_REGISTRY[modality].clip_length(frames))
    results["protocol"] = {"name": "shards", "version": None, "description": "webdataset shards", "grouping": "all"}
    return results


def reported(metrics: dict[str, dict[str, float]], protocol: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The directions and metrics a protocol reports (all of them when it does not say); DSL rows follow theirs."""
    directions, names = protocol.get("directions"), protocol.get("metrics")
    return {direction: {name: value for name, value in values.items() if names is None or name in names}
            for direction, values in metrics.items()
            if directions is None or direction.removesuffix("_dsl") in directions}


def group_captions(rows: list[CaptionRow], grouping: str, protocol: str) -> dict[str, tuple[list[str], str]]:
    """``{video: (captions, where)}`` in first-appearance order, grouped as the protocol says.

    ``one``: exactly one caption per video; ``all``: every caption; ``paragraph``: the captions
    joined by spaces into one (CLIP4Clip's paragraph-to-video retrieval for DiDeMo and ActivityNet).
    """
    grouped: dict[str, list[CaptionRow]] = {}
    for row in rows:
        grouped.setdefault(row.video, []).append(row)
    videos = {}
    for video, video_rows in grouped.items():
        captions = [row.caption for row in video_rows]
        if grouping == "one" and len(captions) > 1:
            raise DataError(f"protocol {protocol} has one caption per video, but {video!r} has {len(captions)} "
                            f"({', '.join(row.where for row in video_rows[:3])})")
        if grouping == "paragraph":
            captions = [" ".join(captions)]
        elif grouping not in ("one", "all"):
            raise ValueError(f"grouping={grouping!r} must be one, all or paragraph")
        videos[video] = (captions, video_rows[0].where)
    return videos


def media_names(protocol: RetrievalProtocol, video: str) -> list[str]:
    """The file names a video id may have under the media root, in the protocol's order."""
    stem = video.rpartition(".")[0] or video
    bare = video.removeprefix(protocol.id_prefix) if protocol.id_prefix else video
    return list(dict.fromkeys(template.format(id=video, stem=stem, bare=bare) for template in protocol.media_names))


def combined_digest(digests: dict[str, dict[str, str]]) -> str:
    """One SHA-256 over a protocol's annotation files (role and digest of each), for comparing cards."""
    if len(digests) == 1:
        return next(iter(digests.values()))["sha256"]
    text = "".join(f"{role}\t{value['sha256']}\n" for role, value in sorted(digests.items()))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
