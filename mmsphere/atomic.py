"""Atomic file writes: a reader sees the old file or the new one, never half of one, and anyone may read it.

A file is written under a temporary name beside its target and renamed over it. The temporary is
created with ``open()``'s mode, 0666 less the umask (0644 under the usual umask 022), and set back to
that mode just before the rename: ``tempfile.mkstemp`` creates 0600 files, and safetensors'
``save_file``/``save_model`` replace the file they are given by a 0600 one, which would leave run
directories, exports and result files unreadable to everyone but their writer. Imports nothing from
mmsphere, so any layer can use it.
"""

from __future__ import annotations

import os
import stat
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_write(path: str | os.PathLike, *, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; when the block ends, rename it over ``path``.

    The file gets the mode a new file gets under the umask, whatever the writer did to it. With
    ``durable``, it is flushed to disk before the rename. An exception in the block removes the
    temporary and leaves ``path`` as it was.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    # O_EXCL with 0666: the kernel applies the umask (and a default ACL), without reading or changing it
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        mode = stat.S_IMODE(os.fstat(descriptor).st_mode)
    finally:
        os.close(descriptor)
    try:
        yield temporary
        os.chmod(temporary, mode)
        if durable:
            _flush_to_disk(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str, *, durable: bool = False) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through :func:`atomic_write`; returns ``path``."""
    with atomic_write(path, durable=durable) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return Path(path)


def _flush_to_disk(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
