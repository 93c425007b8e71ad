"""Checks that run before any work starts: data that exists, an output directory that is ours and every process's."""

from __future__ import annotations

import json
import logging
import secrets
import socket
import tarfile
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import gather_object

from mmsphere.config import save_config
from mmsphere.errors import ConfigError, DataError
from mmsphere.train.config import Config
from mmsphere.data.reader import expand_urls, is_local
from mmsphere.train.checkpoint import STATE_FILE, checkpoint_dir, resolve_resume

logger = logging.getLogger(__name__)

# what a run leaves once it has got somewhere; its config.yaml (and train.log) alone are a start that
# failed before it saved anything, and a corrected retry may use the directory
RUN_MARKERS = ("metrics.jsonl", "sample_weights.jsonl", "summary.json", "model.safetensors")
SHARED_CHECK_FILE = ".mmsphere-shared-check"


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
        if (output_dir / "config.yaml").exists():
            logger.info("output_dir=%s holds the config of a start that saved nothing; starting again there", output_dir)
    return resume_from


def write_run_config(config: Config) -> None:
    """Create the output directory and write the resolved config into it (main process only)."""
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, output_dir / "config.yaml")


def check_shared_output_dir(accelerator: Accelerator, output_dir: Path, resume_from: Path | None) -> None:
    """Every process sees the same output directory and resumes from the same step, or every process raises.

    Several nodes need ``output_dir`` on a file system they all share: checkpoints are written by
    process 0 and read by all. Process 0 writes a file with a fresh random token into the directory;
    after a barrier every process reads it back, and the processes gather what they read, their host
    and the step of the checkpoint they would resume from. Call on every process, after process 0 has
    created the directory.
    """
    if accelerator.num_processes == 1:
        return
    marker = output_dir / SHARED_CHECK_FILE
    if accelerator.is_main_process:
        marker.write_text(secrets.token_hex(16))
    accelerator.wait_for_everyone()
    try:
        token = marker.read_text()
    except OSError:
        token = None
    views = gather_object([{"process": accelerator.process_index, "host": socket.gethostname(), "token": token,
                            "step": _checkpoint_step(resume_from)}])
    if accelerator.is_main_process:
        marker.unlink(missing_ok=True)  # everyone has read it: gather_object waited for all
    first = views[0]
    blind = [view for view in views if view["token"] is None or view["token"] != first["token"]]
    if blind:
        who = ", ".join(f"process {view['process']} on {view['host']}" for view in blind)
        raise DataError(f"output_dir={str(output_dir)!r} is not one directory for all processes: {who} cannot see "
                        f"the file process 0 on {first['host']} wrote there. Training on several nodes needs "
                        f"output_dir on a file system every node mounts (NFS, Lustre, ...); point output_dir there")
    if len({view["step"] for view in views}) > 1:
        steps = ", ".join(f"process {view['process']} on {view['host']}: "
                          f"{'none' if view['step'] is None else 'step ' + str(view['step'])}" for view in views)
        raise DataError(f"train.resume: the processes would resume from different checkpoints ({steps}) of "
                        f"output_dir={str(output_dir)!r}; every process must see the same checkpoints")


def _checkpoint_step(checkpoint: Path | None) -> int | None:
    if checkpoint is None:
        return None
    try:
        return int(json.loads((checkpoint / STATE_FILE).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1  # unreadable here: different from any step another process reads
