"""Checks that run before any work starts: data that exists, an output directory that is ours."""

from __future__ import annotations

import tarfile
from pathlib import Path

from mmsphere.config import Config, ConfigError, DataError, save_config
from mmsphere.data.reader import expand_urls, is_local
from mmsphere.train.checkpoint import checkpoint_dir, resolve_resume

RUN_MARKERS = ("config.yaml", "metrics.jsonl", "model.safetensors")


def local_shard_paths(urls: str) -> list[str] | None:
    """The files a local shard pattern names (brace patterns, globs, ``::``-joined); None for remote/pipe URLs.

    Expanded by :func:`mmsphere.data.reader.expand_urls`, exactly as the data pipeline will; a glob
    that matches nothing raises :class:`DataError`.
    """
    if not all(is_local(part.strip()) for part in urls.split("::")):
        return None
    return expand_urls(urls)


def check_data_sources(config: Config) -> None:
    """Every local shard pattern names existing files; the meta set is non-empty when meta weighting is on.

    Missing or empty shards raise :class:`DataError` naming the config key; a config without sources
    is a :class:`ConfigError`.
    """
    named = [(f"data.train[{index}]", source) for index, source in enumerate(config.data.train)]
    named += [(key, source) for key, source in (("data.meta", config.data.meta), ("data.val", config.data.val))
              if source is not None]
    if not config.data.train:
        raise ConfigError("data.train lists no source: give at least one {urls, modality}")
    for key, source in named:
        try:
            paths = local_shard_paths(source.urls)
        except DataError as error:
            raise DataError(f"{key}.urls={source.urls!r}: {error}") from None
        if paths is None:
            continue
        missing = [path for path in paths if not Path(path).is_file()]
        if missing:
            raise DataError(f"{key}.urls={source.urls!r}: {len(missing)} of {len(paths)} shards do not exist "
                              f"(first: {missing[0]})")
    if config.meta.enabled and config.data.meta is not None:
        paths = local_shard_paths(config.data.meta.urls)
        if paths is not None and not any(_has_members(path) for path in paths):
            raise DataError(f"data.meta.urls={config.data.meta.urls!r} holds no samples, but meta.enabled=true "
                              f"needs a clean meta set")


def _has_members(path: str) -> bool:
    try:
        with tarfile.open(path) as archive:
            return archive.next() is not None
    except (tarfile.TarError, OSError):
        return False


def check_output_dir(config: Config) -> Path | None:
    """Refuse to mix two runs in one directory; return the checkpoint to resume from, if any."""
    output_dir = Path(config.output_dir)
    resume_from = resolve_resume(output_dir, config.train.resume)
    if config.train.resume is None and output_dir.is_dir():
        found = [name for name in RUN_MARKERS if (output_dir / name).exists()]
        if found or checkpoint_dir(output_dir).is_dir():
            raise ConfigError(f"output_dir={str(output_dir)!r} already holds a run ({', '.join(found) or 'checkpoints'}); "
                              f"set train.resume=latest to continue it or choose another output_dir")
    return resume_from


def write_run_config(config: Config) -> None:
    """Create the output directory and write the resolved config into it (main process only)."""
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, output_dir / "config.yaml")
