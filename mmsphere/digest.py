"""The one way mmsphere hashes a file (SHA-256 of its bytes, read in blocks) and a set of named tensors.

Run directories (the weights' digest in a results card), annotation and media lists, the feature
cache's shard identity and the offline towers' provenance all call :func:`file_sha256`, so one file
always has one digest everywhere it is recorded. :func:`tensors_sha256` hashes tensors by content,
not by file, so the same weights saved again (another file format, another tensor order) still match:
a frozen-tower run records its frozen base that way.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from typing import Any

BLOCK_BYTES = 1 << 20  # weights files and shards are large: never read whole into memory


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 hex digest of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(BLOCK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def tensors_sha256(named_tensors: Iterable[tuple[str, Any]]) -> str:
    """SHA-256 of named torch tensors in sorted name order: each name, dtype, shape and its bytes."""
    import torch  # lazy: this module stays importable without torch's start-up cost

    digest = hashlib.sha256()
    for name, tensor in sorted(named_tensors, key=lambda item: item[0]):
        value = tensor.detach().cpu().contiguous()
        # a JSON header per tensor, ending in its byte count: no two (name, dtype, shape, bytes) sequences collide
        header = [name, str(value.dtype), list(value.shape), value.numel() * value.element_size()]
        digest.update(json.dumps(header).encode() + b"\n")
        if value.numel():
            digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
