"""Where a feature cache lives, what its files hold, and how stale or damaged files are told apart (safetensors).

A feature cache holds, for every sample of a shard, what the frozen trunks of the two towers
compute: the image trunk's output for an image (``[N, ...]``) or for each of the ``T`` frames of a
video at the configured sampling (``[N, T, ...]`` plus the frame mask), and the text trunk's output
for every caption of the sample. With frozen trunks these are a pure function of the sample, so
training the heads from them gives the same steps as encoding the pixels every time.

Layout, next to the shards (or under ``data.feature_cache_dir``)::

    <shard dir>/features/<fingerprint>/cache.json                  what the features were computed with
    <shard dir>/features/<fingerprint>/<shard name>.safetensors    one file per shard

**A stale file is never read.** What a stored value depends on is keyed at two levels:

- the folder's ``fingerprint`` (the first 16 hex digits of the SHA-256 of ``cache.json``'s
  ``identity`` and :data:`FORMAT_VERSION`) holds what is the same for every shard: the fully
  resolved architecture config (the JSON's content, never its name), the SHA-256 of the trunks'
  weights and buffers as loaded (so the pretrained weights count through what they put in the
  trunks, and the heads, which train, do not), the tokenizer, the preprocessing (modality, image
  size, mean/std, resize mode, maximum image pixels, frames, frame sampling, fast decoding), the
  precision the trunks ran in, and the versions of torch and open_clip
  (:func:`mmsphere.cache.build.cache_for` assembles it). Any change makes a new folder;
- each shard's file records its shard's ``source`` identity (:func:`source_identity`: size,
  modification time in ns and the SHA-256 of the tar's member headers, which hold every member's
  name, size and time; the content's SHA-256 for a file that is not a plain tar): a shard rewritten
  under its old name no longer matches, and only that shard's file is built again. A remote shard
  (``pipe:``, ``http``) cannot be looked at without reading it all, so it is known by its URL only.

**A damaged file is never read.** Each file stores ``checksum``, the SHA-256 of its metadata and
tensors (:func:`_checksum`), and its structure is checked (row counts, offsets starting at 0,
monotone and within ``caption_rows``, caption rows within ``text_trunk``). A file that fails any
check is rebuilt by the build (with one log line naming it and why) and refused by the reader
with a :class:`DataError` of one line naming it. Both checks run each time a shard's file is opened.

One shard's file holds the tensors

- ``trunk``: float32 (float16 with ``data.feature_cache_dtype: float16``) ``[N, ...]`` (images) or ``[N, T, ...]`` (videos), one row per decoded sample;
- ``frame_mask``: bool ``[N, T]`` (videos only);
- ``text_trunk``: float32 (or float16, as ``trunk``) ``[U, ...]``, one row per distinct caption string of the shard;
- ``caption_rows``: int64 ``[C]``, for each caption of each sample in order, its row of ``text_trunk``;
- ``caption_offsets``: int64 ``[N + 1]``, sample ``i``'s captions are ``caption_rows[o[i]:o[i+1]]``;

and, as JSON strings in the safetensors metadata, ``format`` (:data:`FORMAT_VERSION`),
``fingerprint``, ``url``, ``source`` (the shard's identity, above), ``checksum``, ``reader_skips``
(the reader's skip counts for the shard) and ``records``: one entry per raw sample of the shard in
tar order, ``{"key", "row", "captions", "group"}`` for a decoded one and ``{"key", "skip",
"detail"}`` for one that failed to decode. Keeping failed samples in order lets the training stream
number raw samples exactly as the uncached stream does (the caption draws and resume positions
depend on it).
"""

from __future__ import annotations

import dataclasses

import hashlib
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mmsphere.atomic import atomic_write, write_text_atomic
from mmsphere.digest import file_sha256
from mmsphere.errors import DataError

# "2": the shard's source identity and a checksum in every file, the folder keyed by the full identity
FORMAT_VERSION = "2"
SUFFIX = ".safetensors"
_REBUILD = "`mmsphere cache --config CONFIG` (or a run with data.feature_cache=true) builds it again"


@dataclass(frozen=True)
class FeatureCache:
    """The cache of one model's trunk features for one modality: locates each shard's file."""

    fingerprint: str
    identity: dict[str, Any]
    root: str | None = None  # data.feature_cache_dir; None = next to each shard

    def directory_for(self, url: str) -> Path:
        """The cache folder of the shard ``url``."""
        parent, _ = _split_url(url)
        if self.root is not None:
            # several shard folders (or remote URLs) share one root: one sub-folder per shard folder
            return Path(self.root) / hashlib.sha256(parent.encode()).hexdigest()[:12] / self.fingerprint
        if not _is_local(url):
            raise DataError(f"shard {url!r} is not a local file: set data.feature_cache_dir to a local folder "
                            "for its feature cache")
        return Path(parent) / "features" / self.fingerprint

    def path_for(self, url: str) -> Path:
        """The feature file of the shard ``url``."""
        return self.directory_for(url) / (_split_url(url)[1] + SUFFIX)

    def problem(self, url: str) -> str | None:
        """Why the shard ``url`` has no usable feature file (``"missing"``, stale, damaged), or None when it has one."""
        path = self.path_for(url)
        if not path.is_file():
            return "missing"
        return _load(path, self, url)[1]

    def has(self, url: str) -> bool:
        """Whether the shard ``url`` has a complete, intact feature file of this cache and of the shard as it is now."""
        return self.problem(url) is None

    def write_description(self, url: str) -> None:
        """Write ``cache.json`` (the identity behind the fingerprint) into the shard's cache folder."""
        directory = self.directory_for(url)
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / "cache.json"
        if not target.is_file():
            _atomic_write_text(target, json.dumps({"format": FORMAT_VERSION, "fingerprint": self.fingerprint,
                                                   "identity": self.identity}, indent=2) + "\n")


def make_cache(identity: dict[str, Any], root: str | None = None) -> FeatureCache:
    """A :class:`FeatureCache` whose fingerprint is the digest of ``identity`` (JSON-ready) and the format version."""
    text = json.dumps({"format": FORMAT_VERSION, **identity}, sort_keys=True)
    return FeatureCache(hashlib.sha256(text.encode()).hexdigest()[:16], identity, root)


@dataclass
class ShardFeatures:
    """The contents of one shard's feature file (see the module docstring)."""

    url: str
    records: list[dict[str, Any]]
    reader_skips: dict[str, int]
    trunk: torch.Tensor
    frame_mask: torch.Tensor | None
    text_trunk: torch.Tensor
    caption_rows: torch.Tensor
    caption_offsets: torch.Tensor

    def caption_trunk(self, row: int) -> torch.Tensor:
        """Text trunk features ``[n, ...]`` of the captions of sample ``row``, in caption order."""
        start, stop = int(self.caption_offsets[row]), int(self.caption_offsets[row + 1])
        return self.text_trunk[self.caption_rows[start:stop]]


def write_shard_features(path: Path, features: ShardFeatures, fingerprint: str,
                         source: dict[str, Any] | None = None) -> None:
    """Write one shard's features atomically (a temporary file renamed into place), with its checksum.

    ``source``: the shard's identity when it was read (:func:`source_identity`); taken now if None.
    """
    tensors = {"trunk": features.trunk.contiguous(), "text_trunk": features.text_trunk.contiguous(),
               "caption_rows": features.caption_rows.contiguous(),
               "caption_offsets": features.caption_offsets.contiguous()}
    if features.frame_mask is not None:
        tensors["frame_mask"] = features.frame_mask.contiguous()
    metadata = {"format": FORMAT_VERSION, "fingerprint": fingerprint, "url": features.url,
                "source": json.dumps(source if source is not None else source_identity(features.url),
                                     sort_keys=True),
                "records": json.dumps(features.records), "reader_skips": json.dumps(features.reader_skips)}
    metadata["checksum"] = _checksum(metadata, tensors)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as temporary:  # readable by whoever shares the shards (umask mode)
        save_file(tensors, str(temporary), metadata=metadata)


def read_shard_features(cache: FeatureCache, url: str) -> ShardFeatures:
    """Load the feature file of shard ``url``; a missing, stale or damaged one is a one-line :class:`DataError`."""
    path = cache.path_for(url)
    if not path.is_file():
        raise DataError(f"feature cache: {path} (for shard {url}) does not exist; build the cache with "
                        "`mmsphere cache --config CONFIG` (or train with data.feature_cache=true, which builds it)")
    features, problem = _load(path, cache, url)
    if problem is not None:
        raise DataError(f"feature cache: {path} {problem}; {_REBUILD}")
    return features


def source_identity(url: str) -> dict[str, Any]:
    """What tells a shard from one rewritten under its name: size, mtime (ns) and a digest of its member headers.

    A plain tar's digest covers each member's 512-byte header (name, size, time, mode, header
    checksum) and pax/long-name records, read by seeking past the contents, so it costs per member,
    not per byte: 20 ms for the 10 shards of the 5000-image study set (10,000 members), whose 13 MB
    of 32 px JPEGs hash whole in 8 ms (BENCHMARKS.md); hashing a 1 GB shard of videos whole would
    take most of a second at every epoch. Any other file (a compressed tar) is hashed whole. A
    remote shard is known by its URL only.
    """
    if not _is_local(url):
        return {"url": url}
    try:
        stat = os.stat(url)
        index = _tar_index_digest(url)
        identity = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        if index is not None:
            identity["tar_index_sha256"] = index
        else:
            identity["content_sha256"] = file_sha256(url)
    except OSError as error:
        # an unreadable shard has no features to reuse; the build reads (and counts) it as the reader does
        return {"unreadable": f"{type(error).__name__}: {error}"}
    return identity


def _load(path: Path, cache: FeatureCache, url: str) -> tuple[ShardFeatures | None, str | None]:
    """The file's features, or None and what is wrong with it (one line, without the path)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        return None, f"cannot be read ({type(error).__name__}: {_first_line(error)})"
    if metadata.get("format") != FORMAT_VERSION or metadata.get("fingerprint") != cache.fingerprint:
        return None, (f"has format {metadata.get('format')!r} and fingerprint {metadata.get('fingerprint')!r}, "
                      f"expected {FORMAT_VERSION!r} and {cache.fingerprint!r}")
    if metadata.get("checksum") != _checksum(metadata, tensors):
        return None, "is damaged (its checksum does not match its contents)"
    try:
        features = ShardFeatures(url, json.loads(metadata["records"]), json.loads(metadata["reader_skips"]),
                                 tensors["trunk"], tensors.get("frame_mask"), tensors["text_trunk"],
                                 tensors["caption_rows"], tensors["caption_offsets"])
        stored_source = json.loads(metadata["source"])
    except (KeyError, ValueError) as error:
        return None, f"is incomplete ({type(error).__name__}: {_first_line(error)})"
    problem = _structure_problem(features)
    if problem is not None:
        return None, f"is inconsistent ({problem})"
    if features.trunk.dtype == torch.float16:  # data.feature_cache_dtype=float16: computed on in float32
        features = dataclasses.replace(features, trunk=features.trunk.float(), text_trunk=features.text_trunk.float())
    current = source_identity(url)
    if stored_source != current:
        changed = sorted(key for key in {*stored_source, *current} if stored_source.get(key) != current.get(key))
        return None, f"is stale: shard {url} changed since its features were computed ({', '.join(changed)})"
    return features, None


def _structure_problem(features: ShardFeatures) -> str | None:
    """What is structurally wrong with a file's contents (rows, offsets, caption rows), or None."""
    records = features.records
    if not isinstance(records, list) or not all(isinstance(record, dict) and "key" in record for record in records):
        return "records is not a list of {key, ...} entries"
    if not isinstance(features.reader_skips, dict) or not all(
            isinstance(count, int) and count >= 0 for count in features.reader_skips.values()):
        return "reader_skips is not a map of counts"
    decoded = [record for record in records if "row" in record]
    rows = len(decoded)
    if [record["row"] for record in decoded] != list(range(rows)):
        return "the records' rows are not 0, 1, 2, ... in order"
    if not all(isinstance(record.get("captions"), list) for record in decoded):
        return "a decoded record has no caption list"
    trunk, text_trunk = features.trunk, features.text_trunk
    offsets, caption_rows = features.caption_offsets, features.caption_rows
    if trunk.ndim < 2 or trunk.shape[0] != rows:
        return f"{rows} decoded samples listed, trunk of shape {tuple(trunk.shape)}"
    if features.frame_mask is not None and (features.frame_mask.dtype != torch.bool
                                            or tuple(features.frame_mask.shape) != tuple(trunk.shape[:2])):
        mask = features.frame_mask
        return f"frame_mask of {mask.dtype} {tuple(mask.shape)} for trunk {tuple(trunk.shape)}"
    if offsets.dtype != torch.int64 or caption_rows.dtype != torch.int64 or offsets.ndim != 1 or caption_rows.ndim != 1:
        return "caption_offsets and caption_rows must be 1-D int64"
    if offsets.numel() != rows + 1 or int(offsets[0]) != 0 or int(offsets[-1]) != caption_rows.numel() or bool(
            (offsets[1:] < offsets[:-1]).any()):
        return (f"caption_offsets must be {rows + 1} monotone values from 0 to {caption_rows.numel()}, "
                f"got {offsets.numel()} from {int(offsets[0]) if offsets.numel() else None} "
                f"to {int(offsets[-1]) if offsets.numel() else None}")
    if caption_rows.numel() and (int(caption_rows.min()) < 0 or int(caption_rows.max()) >= text_trunk.shape[0]):
        return f"caption_rows outside the {text_trunk.shape[0]} rows of text_trunk"
    counts = (offsets[1:] - offsets[:-1]).tolist()
    if any(len(record["captions"]) != count for record, count in zip(decoded, counts)):
        return "a record's caption count differs from caption_offsets"
    return None


def _checksum(metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the metadata (all but ``checksum``) and of each tensor's name, dtype, shape and bytes."""
    digest = hashlib.sha256(json.dumps({key: value for key, value in metadata.items() if key != "checksum"},
                                       sort_keys=True).encode())
    for name in sorted(tensors):
        value = tensors[name].detach().cpu().contiguous()
        digest.update(f"|{name}|{value.dtype}|{tuple(value.shape)}|".encode())
        if value.numel():
            digest.update(value.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _tar_index_digest(path: str) -> str | None:
    """SHA-256 of a plain tar's header blocks (and pax / long-name records); None when the file is not one."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while True:
            header = handle.read(tarfile.BLOCKSIZE)
            if len(header) < tarfile.BLOCKSIZE:
                # a file shorter than one header is no tar; one cut short keeps the headers it has
                return None if handle.tell() == len(header) else digest.hexdigest()
            if header == bytes(tarfile.BLOCKSIZE):
                return digest.hexdigest()  # end-of-archive marker
            if header[257:262] != b"ustar":
                return None  # compressed, or not a tar at all
            digest.update(header)
            size = _tar_size(header[124:136])
            if size is None:
                return None
            blocks = (size + tarfile.BLOCKSIZE - 1) // tarfile.BLOCKSIZE * tarfile.BLOCKSIZE
            if header[156:157] in (b"x", b"g", b"L", b"K"):
                digest.update(handle.read(blocks))  # pax and GNU long-name records: names and times
            else:
                handle.seek(blocks, os.SEEK_CUR)


def _tar_size(field: bytes) -> int | None:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for members of 8 GiB and more
        return int.from_bytes(field[1:], "big")
    try:
        return int(field.rstrip(b"\0 ").strip() or b"0", 8)
    except ValueError:
        return None


def _is_local(url: str) -> bool:
    # mmsphere.data.reader.is_local, which this module cannot import (mmsphere.data imports it)
    return not url.startswith("pipe:") and "://" not in url


def _split_url(url: str) -> tuple[str, str]:
    """(the shard's folder, its file name) of a local path or URL."""
    head, _, name = url.rstrip("/").rpartition("/")
    return (head or "."), name


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0]


def _atomic_write_text(path: Path, text: str) -> None:
    write_text_atomic(path, text)
