"""Shard URLs and a tar reader that survives broken shards.

URLs are whatever webdataset accepts: brace patterns, several patterns joined with ``::``, local
paths, ``pipe:`` commands and ``http(s)://`` (opened with :func:`webdataset.gopen.gopen`), plus
shell-style globs (``*``, ``?``, ``[...]``) in local paths, which webdataset does not expand.
The reader streams each tar once, reads only members with a known extension, groups them by key,
and turns every kind of damage (unopenable shard, truncated or corrupt tar, duplicate keys,
links, oversized members) into a counted skip.
"""

from __future__ import annotations

import glob
import io
import random
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import webdataset as wds
from webdataset.gopen import gopen

from mmsphere.data.samples import RawSample, known_extensions, split_member_name
from mmsphere.data.stats import SkipCounter
from mmsphere.errors import ConfigError, DataError, MmsphereError


DEFAULT_MAX_MEMBER_BYTES = 2 << 30
_BLOCK = tarfile.BLOCKSIZE
# tarfile's stream mode reads 20 blocks ahead; a window this size always still holds the block
# where the archive stopped
_TAIL_WINDOW = 1 << 16
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ")


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """Every shard URL of a webdataset pattern (``::``-joined, brace-expanded, local globs) or list of patterns.

    A local path with glob characters becomes the files it matches, sorted, so every process sees
    the same list; a glob that matches no file raises :class:`DataError` (a ``ValueError``) naming
    it. ``pipe:`` commands and ``scheme://`` URLs are never globbed.
    """
    patterns = [urls] if isinstance(urls, str) else list(urls)
    expanded: list[str] = []
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise ConfigError(f"shard URL {pattern!r} must be a string")
        for url in wds.shardlists.expand_urls(pattern):
            if url.strip():
                expanded.extend(_glob_local(url))
    return expanded


def _glob_local(url: str) -> list[str]:
    """The files a local glob matches (sorted); any other URL, or an existing file's literal name, as it is."""
    # a file whose name holds [ ] or ? is taken literally rather than read as a pattern
    if not is_local(url) or not glob.has_magic(url) or Path(url).is_file():
        return [url]
    matches = sorted(path for path in glob.glob(url, recursive=True) if Path(path).is_file())
    if not matches:
        raise DataError(f"shard pattern {url!r} names no shard (no file matches the glob)")
    return matches


def is_local(url: str) -> bool:
    """True for plain file paths (not ``pipe:`` commands, not ``scheme://`` URLs)."""
    return not url.startswith("pipe:") and "://" not in url


def check_shards(urls: str | Sequence[str], what: str) -> list[str]:
    """Expand ``urls``; raise :class:`DataError` when it names nothing or a local shard that does not exist."""
    try:
        expanded = expand_urls(urls)
    except MmsphereError as error:
        raise type(error)(f"{what}: {error}") from None
    if not expanded:
        raise DataError(f"{what}: shard pattern {urls!r} names no shard")
    missing = [url for url in expanded if is_local(url) and not Path(url).is_file()]
    if missing:
        raise DataError(
            f"{what}: shard {missing[0]!r} does not exist ({len(missing)} of {len(expanded)} shards of "
            f"{urls!r} are missing)"
        )
    return expanded


def stream_seed(*parts: int | str) -> int:
    """A 64-bit seed mixed from integers and names, identical in every process."""
    entropy = [part if isinstance(part, int) else int.from_bytes(part.encode(), "little") for part in parts]
    return int(np.random.SeedSequence([abs(value) for value in entropy]).generate_state(2, np.uint64)[0])


def split_shards(urls: Sequence[str], rank: int, world_size: int, worker: int, num_workers: int) -> list[str]:
    """This process's and worker's share of an ordered shard list: by node first, then by worker."""
    return list(urls)[rank::world_size][worker::num_workers]


def shuffled(urls: Sequence[str], seed: int) -> list[str]:
    """The shard list in an order fixed by ``seed`` (the same in every process)."""
    order = list(urls)
    random.Random(seed).shuffle(order)
    return order


def resampled_shards(urls: Sequence[str], seed: int) -> Iterator[str]:
    """An endless draw of shards with replacement."""
    rng = random.Random(seed)
    while True:
        yield urls[rng.randrange(len(urls))]


class _TailRecorder(io.RawIOBase):
    """Pass-through reader that remembers the last bytes read, to check how the archive ended."""

    def __init__(self, stream, prefix: bytes = b""):
        super().__init__()
        self.stream = stream
        self.prefix = prefix
        self.window = bytearray()
        self.window_start = 0
        self.head = b""

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if self.prefix:
            data, self.prefix = (self.prefix, b"") if size < 0 or size >= len(self.prefix) else (
                self.prefix[:size], self.prefix[size:])
        else:
            data = self.stream.read(size)
        if len(self.head) < 8:
            self.head += data[: 8 - len(self.head)]
        self.window += data
        excess = len(self.window) - _TAIL_WINDOW
        if excess > 0:
            del self.window[:excess]
            self.window_start += excess
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def first_bytes_at(self, offset: int, count: int) -> bytes | None:
        start = offset - self.window_start
        return bytes(self.window[start : start + count]) if start >= 0 else None


def read_tar_samples(
    urls: Iterable[str],
    counter: SkipCounter,
    *,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
    on_shard_end=None,
) -> Iterator[RawSample]:
    """Stream the samples of each shard in turn; damage is counted on ``counter``, never raised.

    ``on_shard_end(url, samples)`` is called after each shard with the number of samples it gave.
    """
    for url in urls:
        count = 0
        for sample in _read_one_shard(url, counter, max_member_bytes):
            count += 1
            yield sample
        if on_shard_end is not None:
            on_shard_end(url, count)


def _read_one_shard(url: str, counter: SkipCounter, max_member_bytes: int) -> Iterator[RawSample]:
    try:
        stream = gopen(url, "rb")
    except Exception as error:
        counter.record("shard_open_error", url=url, detail=f"{type(error).__name__}: {error}")
        return
    broken = False
    try:
        try:
            first = stream.read(_BLOCK)
        except Exception as error:  # a pipe: whose command already failed raises on read
            broken = True
            counter.record("shard_open_error", url=url, detail=f"{type(error).__name__}: {error}")
            return
        if not first:
            broken = True
            _close_empty(stream, url, counter)
            return
        recorder = _TailRecorder(stream, first)
        seen: set[str] = set()
        current: RawSample | None = None
        kept = set(known_extensions())
        try:
            archive = tarfile.open(fileobj=recorder, mode="r|*")
            for info in archive:
                # stream mode keeps every header it has read unless told otherwise
                archive.members = []
                parts = split_member_name(info.name)
                if not info.isreg():
                    if not info.isdir():
                        counter.record("non_regular_member", url=url, detail=info.name)
                    continue
                if parts is None or parts[1] not in kept:
                    counter.record("unknown_member", url=url, detail=info.name)
                    continue
                if info.size > max_member_bytes:
                    counter.record("oversized_member", url=url, detail=f"{info.name}: {info.size} bytes")
                    continue
                key, extension = parts
                member = archive.extractfile(info)
                data = member.read() if member is not None else b""
                if current is not None and (current.key != key or extension in current.members):
                    yield from _finish(current, seen, counter)
                    current = None
                if current is None:
                    current = RawSample(key, url)
                current.members[extension] = data
            if not _ended_cleanly(archive, recorder):
                broken = True
                counter.record("truncated_tar", url=url, detail=f"no end-of-archive marker after byte {archive.offset}")
        except (tarfile.TarError, EOFError, OSError, ValueError) as error:
            broken = True
            counter.record("truncated_tar", url=url, detail=f"{type(error).__name__}: {error}")
        if current is not None:
            yield from _finish(current, seen, counter)
    finally:
        try:
            stream.close()
        except Exception as error:  # a pipe: command that failed reports it here
            if not broken:
                counter.record("shard_open_error", url=url, detail=f"{type(error).__name__}: {error}")


def _close_empty(stream, url: str, counter: SkipCounter) -> None:
    """An empty stream is a failed ``pipe:`` command if closing it says so, else an empty shard."""
    try:
        stream.close()
    except Exception as error:
        counter.record("shard_open_error", url=url, detail=f"{type(error).__name__}: {error}")
        return
    counter.record("truncated_tar", url=url, detail="the shard is empty")


def _finish(sample: RawSample, seen: set[str], counter: SkipCounter) -> Iterator[RawSample]:
    if sample.key in seen:
        counter.record("duplicate_key", key=sample.key, url=sample.url)
        return
    seen.add(sample.key)
    yield sample


def _ended_cleanly(archive: tarfile.TarFile, recorder: _TailRecorder) -> bool:
    """Whether the archive stopped at an end-of-archive (zero) block rather than at damage."""
    if recorder.head.startswith(_COMPRESSED_MAGIC):
        return True  # offsets count decompressed bytes; damage there surfaces as read errors
    while recorder.read(_TAIL_WINDOW):
        pass
    block = recorder.first_bytes_at(archive.offset, _BLOCK)
    return block is not None and len(block) == _BLOCK and not any(block)
