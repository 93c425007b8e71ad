"""Where a feature cache lives and what its files hold; read and written without pickle (safetensors).

A feature cache holds, for every sample of a shard, what the frozen trunks of the two towers
compute: the image trunk's output for an image (``[N, ...]``) or for each of the ``T`` frames of a
video at the configured sampling (``[N, T, ...]`` plus the frame mask), and the text trunk's output
for every caption of the sample. With frozen trunks these are a pure function of the sample, so
training the heads from them gives the same steps as encoding the pixels every time.

Layout, next to the shards (or under ``data.feature_cache_dir``)::

    <shard dir>/features/<fingerprint>/cache.json                  what the features were computed with
    <shard dir>/features/<fingerprint>/<shard name>.safetensors    one file per shard

``fingerprint``: the first 16 hex digits of the SHA-256 of ``cache.json``'s ``identity`` (the trunk
weights' digest, the preprocessing, the modality and frame count, the tokenizer); a change of any of
them makes a new folder, so a stale cache is never read. One shard's file holds the tensors

- ``trunk``: float32 ``[N, ...]`` (images) or ``[N, T, ...]`` (videos), one row per decoded sample;
- ``frame_mask``: bool ``[N, T]`` (videos only);
- ``text_trunk``: float32 ``[U, ...]``, one row per distinct caption string of the shard;
- ``caption_rows``: int64 ``[C]``, for each caption of each sample in order, its row of ``text_trunk``;
- ``caption_offsets``: int64 ``[N + 1]``, sample ``i``'s captions are ``caption_rows[o[i]:o[i+1]]``;

and, as JSON strings in the safetensors metadata, ``format`` (``"1"``), ``fingerprint``, ``url``,
``reader_skips`` (the reader's skip counts for the shard) and ``records``: one entry per raw sample
of the shard in tar order, ``{"key", "row", "captions", "group"}`` for a decoded one and
``{"key", "skip", "detail"}`` for one that failed to decode. Keeping failed samples in order lets
the training stream number raw samples exactly as the uncached stream does (the caption draws and
resume positions depend on it).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mmsphere.errors import DataError

FORMAT_VERSION = "1"
SUFFIX = ".safetensors"


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
        if "://" in url or url.startswith("pipe:"):
            raise DataError(f"shard {url!r} is not a local file: set data.feature_cache_dir to a local folder "
                            "for its feature cache")
        return Path(parent) / "features" / self.fingerprint

    def path_for(self, url: str) -> Path:
        """The feature file of the shard ``url``."""
        return self.directory_for(url) / (_split_url(url)[1] + SUFFIX)

    def has(self, url: str) -> bool:
        """Whether the shard ``url`` has a complete feature file with this cache's fingerprint."""
        path = self.path_for(url)
        if not path.is_file():
            return False
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
        except (SafetensorError, OSError):
            return False
        return metadata.get("format") == FORMAT_VERSION and metadata.get("fingerprint") == self.fingerprint

    def write_description(self, url: str) -> None:
        """Write ``cache.json`` (the identity behind the fingerprint) into the shard's cache folder."""
        directory = self.directory_for(url)
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / "cache.json"
        if not target.is_file():
            _atomic_write_text(target, json.dumps({"format": FORMAT_VERSION, "fingerprint": self.fingerprint,
                                                   "identity": self.identity}, indent=2) + "\n")


def make_cache(identity: dict[str, Any], root: str | None = None) -> FeatureCache:
    """A :class:`FeatureCache` whose fingerprint is the digest of ``identity`` (JSON-ready)."""
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


def write_shard_features(path: Path, features: ShardFeatures, fingerprint: str) -> None:
    """Write one shard's features atomically (a temporary file renamed into place)."""
    tensors = {"trunk": features.trunk.contiguous(), "text_trunk": features.text_trunk.contiguous(),
               "caption_rows": features.caption_rows, "caption_offsets": features.caption_offsets}
    if features.frame_mask is not None:
        tensors["frame_mask"] = features.frame_mask.contiguous()
    metadata = {"format": FORMAT_VERSION, "fingerprint": fingerprint, "url": features.url,
                "records": json.dumps(features.records), "reader_skips": json.dumps(features.reader_skips)}
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(temporary), metadata=metadata)
    os.replace(temporary, path)


def read_shard_features(cache: FeatureCache, url: str) -> ShardFeatures:
    """Load the feature file of shard ``url``; a missing, foreign or damaged file is a :class:`DataError`."""
    path = cache.path_for(url)
    if not path.is_file():
        raise DataError(f"feature cache: {path} (for shard {url}) does not exist; build the cache with "
                        "`mmsphere cache --config CONFIG` (or train with data.feature_cache=true, which builds it)")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        if metadata.get("format") != FORMAT_VERSION or metadata.get("fingerprint") != cache.fingerprint:
            raise DataError(f"feature cache: {path} has format {metadata.get('format')!r} and fingerprint "
                            f"{metadata.get('fingerprint')!r}, expected {FORMAT_VERSION!r} and {cache.fingerprint!r}; "
                            "delete it and build the cache again")
        features = ShardFeatures(url, json.loads(metadata["records"]), json.loads(metadata["reader_skips"]),
                                 tensors["trunk"], tensors.get("frame_mask"), tensors["text_trunk"],
                                 tensors["caption_rows"], tensors["caption_offsets"])
    except DataError:
        raise
    except (SafetensorError, OSError, KeyError, ValueError) as error:
        raise DataError(f"feature cache: {path} cannot be read ({type(error).__name__}: {error}); delete it and "
                        "build the cache again") from error
    rows = sum(1 for record in features.records if "row" in record)
    if features.trunk.shape[0] != rows or features.caption_offsets.numel() != rows + 1:
        raise DataError(f"feature cache: {path} is inconsistent ({rows} decoded samples listed, trunk of shape "
                        f"{tuple(features.trunk.shape)}); delete it and build the cache again")
    return features


def _split_url(url: str) -> tuple[str, str]:
    """(the shard's folder, its file name) of a local path or URL."""
    head, _, name = url.rstrip("/").rpartition("/")
    return (head or "."), name


def _atomic_write_text(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)
