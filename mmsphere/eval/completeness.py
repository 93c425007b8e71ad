"""No silent results on incomplete data: find every listed file first, refuse what is missing, fingerprint the rest.

A benchmark's number means something only on the whole benchmark. Every listed item is looked up
before anything is encoded; items that are missing, empty, unreadable or of an unknown type (and,
during encoding, items that do not decode) stop the evaluation with one line naming how many of how
many and the first few, unless the user allows a subset (``--allow-missing``); then every output
says so, and the names go to a file. The media actually evaluated are fingerprinted (count, names
and sizes digested) so that two results cards can tell whether they saw the same data.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmsphere.atomic import write_text_atomic
from mmsphere.data.reader import expand_urls, is_local
from mmsphere.data.modalities import media_extensions
from mmsphere.data.stats import SKIP_REASONS
from mmsphere.errors import DataError

ALLOW_FLAG = "--allow-missing"
SHOWN_NAMES = 5  # names in the one-line message; the file holds all of them
# shard skip reasons that drop a member but not necessarily a sample (a sample that lost its media
# is counted again as missing_media); every other reason loses at least one sample
MEMBER_REASONS = ("unknown_member", "oversized_member", "non_regular_member")
LOSSY_REASONS = tuple(reason for reason in SKIP_REASONS if reason not in MEMBER_REASONS)


class IncompleteDataError(DataError):
    """Listed items are missing or unreadable and the user did not allow evaluating the rest."""


@dataclass(frozen=True)
class MissingItem:
    """A listed item that is not evaluated: its name (video id, file or list line), the reason, a detail."""

    name: str
    reason: str
    detail: str = ""


def refuse_incomplete(missing: Sequence[MissingItem], listed: int, what: str, *, allow_missing: bool,
                      missing_file: str | os.PathLike | None = None, stage: str = "before encoding") -> None:
    """Raise :class:`IncompleteDataError` (one line) when ``missing`` is not empty and a subset is not allowed.

    ``what`` names the set (``"videos of protocol msrvtt-1k-a under 'videos/'"``); ``missing_file``,
    when given, receives every name first so that the message can point to it.
    """
    if not missing or allow_missing:
        return
    where = ""
    if missing_file is not None:
        where = f"; all names in {write_missing(missing_file, missing)}"
    raise IncompleteDataError(
        f"{len(missing)} of {listed} {what} are missing or unreadable ({describe_reasons(missing)}), "
        f"stopped {stage}: {', '.join(item.name for item in missing[:SHOWN_NAMES])}"
        f"{', ...' if len(missing) > SHOWN_NAMES else ''}{where}; fix the paths, or pass {ALLOW_FLAG} to evaluate "
        f"the {listed - len(missing)} found (every output then says it is a subset)"
    )


def describe_reasons(missing: Iterable[MissingItem]) -> str:
    """``"998 missing, 1 empty_file"``: the count of each reason, most frequent first."""
    return ", ".join(f"{count} {reason}" for reason, count in Counter(item.reason for item in missing).most_common())


def write_missing(path: str | os.PathLike, missing: Sequence[MissingItem]) -> Path:
    """One line per item not evaluated: ``name<TAB>reason<TAB>detail``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = "".join(f"{item.name}\t{item.reason}\t{item.detail}".rstrip("\t") + "\n" for item in missing)
    return write_text_atomic(path, "name\treason\tdetail\n" + lines)


def completeness(listed: int, evaluated: int, missing: Sequence[MissingItem],
                 missing_file: str | os.PathLike | None) -> dict[str, Any]:
    """What every output records: n listed, n evaluated, whether it is a subset and what is missing."""
    record: dict[str, Any] = {"n_listed": listed, "n_evaluated": evaluated,
                              "subset": bool(missing) or evaluated < listed}
    if missing:
        record["missing"] = {"count": len(missing), "by_reason": dict(Counter(item.reason for item in missing)),
                             "first": [item.name for item in missing[:SHOWN_NAMES]],
                             "file": str(write_missing(missing_file, missing)) if missing_file is not None else None}
    return record


def lost_samples(skipped: dict[str, int]) -> dict[str, int]:
    """The skip counts (``mmsphere.data.stats`` reasons) that lost samples, leaving out member-level ones."""
    return {reason: count for reason, count in skipped.items() if reason not in MEMBER_REASONS and count}


# --------------------------------------------------------------------------------------------
# finding media files


class MediaIndex:
    """Every file under a media root by name and by stem (name without its last extension), found once."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"media root {str(self.root)!r} is not a directory")
        self.by_name: dict[str, Path] = {}
        self.by_stem: dict[str, list[Path]] = {}
        for path in sorted(_walk(self.root)):
            self.by_name.setdefault(path.name, path)
            self.by_stem.setdefault(path.name.rpartition(".")[0] or path.name, []).append(path)

    def find(self, names: Iterable[str]) -> Path | None:
        """The first file matching one of ``names`` in order; ``NAME.*`` matches NAME with any extension.

        Among several extensions of one name, known video and image extensions are preferred, in
        the decoder's order.
        """
        for name in names:
            if name.endswith(".*"):
                candidates = self.by_stem.get(name[:-2], [])
                if candidates:
                    return min(candidates, key=_extension_rank)
            elif name in self.by_name:
                return self.by_name[name]
        return None


def _walk(root: Path) -> Iterable[Path]:
    """Files under ``root``, following links to folders but never the same folder twice."""
    seen: set[tuple[int, int]] = set()
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            status = folder.stat()
        except OSError:
            continue
        if (status.st_dev, status.st_ino) in seen:
            continue
        seen.add((status.st_dev, status.st_ino))
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_dir():
                    stack.append(Path(entry.path))
                elif entry.is_file():
                    yield Path(entry.path)
            except OSError:
                continue


def _extension_rank(path: Path) -> tuple[int, str]:
    extension = path.suffix.lower().lstrip(".")
    known = media_extensions()
    return (known.index(extension) if extension in known else len(known), path.name)


def check_file(path: Path, name: str) -> MissingItem | None:
    """None when ``path`` is a non-empty, readable file of a known media type; else why not."""
    try:
        status = path.stat()
    except FileNotFoundError:
        return MissingItem(name, "missing", str(path))
    except OSError as error:
        return MissingItem(name, "unreadable_file", f"{path}: {error.strerror}")
    if not path.is_file():
        return MissingItem(name, "not_a_file", str(path))
    if path.suffix.lower().lstrip(".") not in media_extensions():
        return MissingItem(name, "unsupported_extension",
                           f"{path} (decoded: {', '.join(media_extensions())}; convert it, e.g. to mp4)")
    if status.st_size == 0:
        return MissingItem(name, "empty_file", str(path))
    if not os.access(path, os.R_OK):
        return MissingItem(name, "unreadable_file", f"{path}: permission denied")
    return None


# --------------------------------------------------------------------------------------------
# fingerprints


def media_fingerprint(files: Iterable[tuple[str, Path]], root: str | os.PathLike | None = None) -> dict[str, Any]:
    """Count, total size and SHA-256 over the sorted ``name<TAB>relative path<TAB>size`` lines of the media used.

    Paths are relative to ``root`` when under it, so the same files under another root give the
    same fingerprint; the content itself is not read (a benchmark's videos are large), its size is.
    """
    root_path = Path(root).resolve() if root is not None else None
    lines, total = [], 0
    for name, path in files:
        size = path.stat().st_size
        total += size
        resolved = path.resolve()
        relative = (resolved.relative_to(root_path).as_posix()
                    if root_path is not None and resolved.is_relative_to(root_path) else path.name)
        lines.append(f"{name}\t{relative}\t{size}\n")
    lines.sort()
    return {"count": len(lines), "total_bytes": total,
            "sha256": hashlib.sha256("".join(lines).encode("utf-8")).hexdigest()}


def shard_fingerprint(urls: str) -> dict[str, Any] | None:
    """The fingerprint of local shard files (the shards are the media); None when any shard is remote."""
    expanded = expand_urls(urls)
    if not all(is_local(url) for url in expanded):
        return None
    return media_fingerprint([(Path(url).name, Path(url)) for url in expanded])


