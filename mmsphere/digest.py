"""The one way mmsphere hashes a file: SHA-256 of its bytes, read in blocks.

Run directories (the weights' digest in a results card), annotation and media lists, the feature
cache's shard identity and the offline towers' provenance all call :func:`file_sha256`, so one file
always has one digest everywhere it is recorded.
"""

from __future__ import annotations

import hashlib
import os

BLOCK_BYTES = 1 << 20  # weights files and shards are large: never read whole into memory


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 hex digest of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(BLOCK_BYTES):
            digest.update(block)
    return digest.hexdigest()
