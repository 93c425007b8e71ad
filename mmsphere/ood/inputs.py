"""What ``mmsphere score-ood`` reads: label files, prompt templates and image sets (folders, lists or shards).

An image set is a folder (``DIR/<class>/*.jpg``, ImageFolder-like, or images directly under ``DIR``),
a list file (``.txt``: one ``relative/path [label]`` per line, OpenOOD's ``benchmark_imglist`` layout)
or webdataset shard URLs of images. The files of a folder or list are found before anything is
encoded (:class:`ImageFiles`), so a missing or empty file stops the run at once. Images are decoded
and preprocessed by the data package's own functions, so scoring sees exactly the pixels training
and retrieval evaluation see.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from mmsphere.config import DataError, MmsphereError
from mmsphere.data import build_eval_loader
from mmsphere.data.decode import DecodeError, decode_image
from mmsphere.data.transforms import to_model_frames
from mmsphere.eval.completeness import MissingItem, check_file

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
DEFAULT_TEMPLATES = ("a photo of a {}.",)  # the prompt of the MCM paper


def read_names(path: str | os.PathLike, what: str) -> list[str]:
    """Names, one per line, from a label file; blank lines, duplicates and an empty file are errors."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} file {str(path)!r} does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise MmsphereError(f"{what} file {str(path)!r} is not UTF-8 text: {error}") from None
    names: list[str] = []
    first_line: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        name = line.strip()
        if not name:
            raise MmsphereError(f"{what} file {str(path)!r} has a blank line at line {number}; remove it")
        if name in first_line:
            raise MmsphereError(
                f"{what} file {str(path)!r} lists {name!r} twice (lines {first_line[name]} and {number})"
            )
        first_line[name] = number
        names.append(name)
    if not names:
        raise MmsphereError(f"{what} file {str(path)!r} is empty")
    return names


def read_templates(path: str | os.PathLike | None) -> list[str]:
    """Prompt templates (one per line, each with exactly one ``{}`` for the class name)."""
    if path is None:
        return list(DEFAULT_TEMPLATES)
    templates = read_names(path, "templates")
    for template in templates:
        if template.count("{}") != 1:
            raise MmsphereError(
                f"template {template!r} in {str(path)!r} must hold exactly one '{{}}' where the class name goes"
            )
    return templates


def parse_ood_sets(specs: list[str]) -> dict[str, str]:
    """``["NAME=DIR_OR_SHARDS", ...]`` -> ``{NAME: DIR_OR_SHARDS}``; names are unique and not 'id'/'mean'."""
    sets: dict[str, str] = {}
    for spec in specs:
        name, separator, location = spec.partition("=")
        name, location = name.strip(), location.strip()
        if not separator or not name or not location:
            raise MmsphereError(f"--ood expects NAME=DIR_OR_SHARDS, got {spec!r}")
        if name in ("id", "mean"):
            raise MmsphereError(f"--ood name {name!r} is reserved; choose another name for {location!r}")
        if name in sets:
            raise MmsphereError(f"--ood name {name!r} is given twice")
        sets[name] = location
    return sets


def is_folder(spec: str) -> bool:
    """True when an image-set argument names an existing directory (otherwise it is shard URLs)."""
    return Path(spec).is_dir()


def is_list_file(spec: str) -> bool:
    """True when an image-set argument names an existing ``.txt`` list of image paths."""
    return spec.lower().endswith(".txt") and Path(spec).is_file()


@dataclass
class ImageFiles:
    """The image files of a folder or list, looked up before encoding: those found and those that are not."""

    spec: str  # the folder or list file
    items: list[tuple[Path, str | None]]  # (path, class) of every usable file, in order
    missing: list[MissingItem]  # listed files that are missing, empty or unreadable
    listed: int  # files the folder holds or the list names

    @property
    def names(self) -> list[tuple[str, Path]]:
        """``(name, path)`` of the usable files, for the media fingerprint."""
        return [(str(path), path) for path, _ in self.items]


def image_files(spec: str, root: str | os.PathLike | None = None) -> ImageFiles:
    """The files of an image folder or of a list file (paths relative to ``root``, default the list's folder)."""
    if is_list_file(spec):
        listed = read_image_list(spec, root)
    else:
        listed = list_image_folder(spec)
    items, missing = [], []
    for path, label in listed:
        problem = check_file(path, str(path))
        if problem is None:
            items.append((path, label))
        else:
            missing.append(problem)
    return ImageFiles(spec, items, missing, len(listed))


def read_image_list(path: str | os.PathLike, root: str | os.PathLike | None = None) -> list[tuple[Path, str | None]]:
    """``(path, label)`` of each line ``relative/path [label]`` of a list file (OpenOOD's imglist layout).

    Paths are relative to ``root`` (default: the list's folder); the label, when present, is kept
    as written (a class name, or OpenOOD's class index).
    """
    path = Path(path)
    base = Path(root) if root is not None else path.parent
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"image list {str(path)!r} does not exist") from None
    except UnicodeDecodeError as error:
        raise DataError(f"image list {str(path)!r} is not UTF-8 text: {error}") from None
    items: list[tuple[Path, str | None]] = []
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, _, label = line.strip().partition(" ")
        image = Path(name)
        items.append((image if image.is_absolute() else base / image, label.strip() or None))
    if not items:
        raise DataError(f"image list {str(path)!r} names no image")
    return items


def list_image_folder(root: str | os.PathLike) -> list[tuple[Path, str | None]]:
    """``(path, class)`` of every image under ``root``, sorted; class is the sub-folder (None at top level)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {str(root)!r} does not exist")
    found = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            relative = path.relative_to(root)
            found.append((path, relative.parts[0] if len(relative.parts) > 1 else None))
    if not found:
        raise MmsphereError(
            f"image folder {str(root)!r} holds no images ({', '.join(IMAGE_SUFFIXES)}), "
            "expected DIR/<class>/*.jpg or DIR/*.jpg"
        )
    return found


@dataclass
class ImageBatch:
    """Preprocessed images ``[B, 3, S, S]`` with their identifiers (file path or sample key) and classes."""

    images: torch.Tensor
    names: list[str]
    classes: list[str | None]


class _ImageFolderDataset(Dataset):
    def __init__(self, items: list[tuple[Path, str | None]], image_size: int, mean: tuple, std: tuple) -> None:
        self.items, self.image_size, self.mean, self.std = items, image_size, mean, std

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str, str | None] | tuple[None, str, str]:
        path, label = self.items[index]
        try:
            pixels = decode_image(path.read_bytes())
        except DecodeError as error:
            return None, str(path), error.reason
        except OSError as error:
            logger.debug("cannot read %s: %s", path, error)
            return None, str(path), "unreadable_file"
        frames, _ = to_model_frames(pixels[None], num_frames=1, image_size=self.image_size, mean=self.mean,
                                    std=self.std)
        return frames[0], str(path), label


def _collate(items: list[tuple[Any, str, Any]]) -> tuple[list[tuple[torch.Tensor, str, Any]], list[tuple[str, str]]]:
    good = [item for item in items if item[0] is not None]
    bad = [(name, reason) for image, name, reason in items if image is None]
    return good, bad


def image_batches(
    spec: str | ImageFiles,
    *,
    image_size: int,
    image_mean: tuple[float, float, float],
    image_std: tuple[float, float, float],
    batch_size: int,
    workers: int = 0,
    skipped: dict[str, int] | None = None,
    failed: list[MissingItem] | None = None,
) -> Iterator[ImageBatch]:
    """Preprocessed batches of an image folder, list or shards; undecodable images are skipped, counted, named.

    ``failed`` (folders and lists) receives each image that did not decode; a shard's skipped
    samples are counted by the data package (:func:`mmsphere.data.skipped_counts`).
    """
    if isinstance(spec, ImageFiles) or is_folder(spec) or is_list_file(spec):
        files = spec if isinstance(spec, ImageFiles) else image_files(spec)
        if not isinstance(spec, ImageFiles):  # found unusable before decoding: counted like undecodable ones
            for item in files.missing:
                logger.warning("skipped unreadable image %s (%s)", item.name, item.reason)
                if skipped is not None:
                    skipped[item.reason] = skipped.get(item.reason, 0) + 1
                if failed is not None:
                    failed.append(item)
        items = files.items
        loader = DataLoader(_ImageFolderDataset(items, image_size, image_mean, image_std), batch_size=batch_size,
                            num_workers=workers, collate_fn=_collate)
        for good, bad in loader:
            for name, reason in bad:
                logger.warning("skipped unreadable image %s (%s)", name, reason)
                if skipped is not None:
                    skipped[reason] = skipped.get(reason, 0) + 1
                if failed is not None:
                    failed.append(MissingItem(name, reason))
            if good:
                yield ImageBatch(torch.stack([image for image, _, _ in good]), [name for _, name, _ in good],
                                 [label for _, _, label in good])
        return
    for batch in build_eval_loader(spec, "image", frames=1, image_size=image_size, image_mean=image_mean,
                                   image_std=image_std, batch_size=batch_size, workers=workers):
        yield ImageBatch(batch.media, list(batch.keys), [None] * len(batch))
