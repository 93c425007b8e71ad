"""Build a feature cache: decode every sample of a source once and run it through the frozen trunks.

Resumable at shard granularity: a shard whose feature file is complete (written atomically, with
this cache's fingerprint), intact (its checksum) and of the shard as it is now (its source identity)
is not encoded again; any other is, with a log line saying why. Several processes split the shards
between them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from mmsphere.data.batching import collate_eval
from mmsphere.data.feature_files import FeatureCache, ShardFeatures, make_cache, source_identity, write_shard_features
from mmsphere.data.config import DataConfig
from mmsphere.errors import ConfigError
from mmsphere.data.decode import DecodeError
from mmsphere.data.modalities import MODALITY_REGISTRY
from mmsphere.data.reader import check_shards, is_local, read_tar_samples
from mmsphere.data.samples import DecodeOptions, decode_sample
from mmsphere.data.stats import SkipCounter

logger = logging.getLogger(__name__)


@dataclass
class BuildReport:
    """What one call of :func:`build_feature_cache` did."""

    shards_built: int = 0
    shards_found: int = 0  # already complete: not encoded again
    samples: int = 0
    skipped: dict[str, int] = field(default_factory=dict)


def check_cacheable(model: torch.nn.Module, data: DataConfig) -> None:
    """Raise a :class:`ConfigError` naming the key when the trunks' outputs are not a pure function of each sample."""
    parameters = dict(model.named_parameters())
    trainable = [name for name in model.trunk_parameter_names() if parameters[name].requires_grad]
    if trainable:
        raise ConfigError(f"data.feature_cache=true needs frozen tower trunks (model.trainable=heads or "
                          f"last_blocks=K, or model.freeze_image and model.freeze_text); {len(trainable)} trunk "
                          f"parameters train, "
                          f"e.g. {trainable[0]!r}")
    if data.random_offset:
        raise ConfigError("data.feature_cache=true needs data.random_offset=false: the cache holds one fixed frame "
                          "sampling per video")
    model.head_slots()  # raises when a tower has no separable projection head


def trunk_digest(model: torch.nn.Module) -> str:
    """SHA-256 of the trunks' weights and buffers (names, shapes, dtypes, values): everything of the towers but what trains.

    With ``model.trainable=last_blocks=K`` the trained blocks and the modules after them are left out too, so
    the digest names exactly the frozen part whose output the cache stores: another K is another digest.
    """
    heads = model.head_prefixes()
    blocks = getattr(model.config, "trainable_blocks", None)
    # last_blocks=K: the modules of the trained blocks and of what follows them (their buffers too)
    trained_modules = {name.rpartition(".")[0] for name in model.last_block_parameter_names(blocks)} if blocks else set()
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        if not name.startswith("clip.") or name in ("clip.logit_scale", "clip.logit_bias"):
            continue
        if any(name == prefix or name.startswith(prefix + ".") for prefix in heads):
            continue  # a head trains; the cache holds its input
        if name.rpartition(".")[0] in trained_modules:
            continue  # so does a trained block (and the norms after it): the cache holds the first one's input
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tuple(value.shape)}|{value.dtype}|".encode())
        if value.numel():
            digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# the geometry of mmsphere.data.transforms.resize_center_crop and the frame choice of
# sample_frame_indices (random offsets are refused by check_cacheable): change these names with the code
RESIZE_MODE = "short side to image_size (bicubic, antialiased), centre crop"
FRAME_SAMPLING = "linspace(0, n-1, T) rounded half up"
# train.precision -> the precision the trunks run in while a cache is built, and its autocast dtype
PRECISIONS: dict[str, str] = {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def cache_for(model: torch.nn.Module, data: DataConfig, modality: str, *, digest: str | None = None,
              image_size: int | None = None, evaluation: bool = False, precision: str = "no") -> FeatureCache:
    """The feature cache of ``model``'s trunks for sources of ``modality`` decoded as ``data`` says.

    ``evaluation``: decoded as evaluation decodes, exactly (never ``data.fast_decode``) and at
    ``image_size`` (the model's own input size) instead of ``data.image_size``. ``precision``
    (``train.precision``): the trunks run under that autocast while the cache is built, as they do
    in a training step (the meta step, which an uncached run computes in float32, reads the same
    stored values). The identity holds everything a stored value depends on (see
    :mod:`mmsphere.data.feature_files`); its digest names the cache's folder.
    """
    import open_clip  # lazy: seconds to import, and `mmsphere train --help` imports this module

    if precision not in PRECISIONS:
        raise ConfigError(f"precision={precision!r} must be one of {', '.join(PRECISIONS)}")
    tokenizer = model.tokenizer
    probe = tokenizer(["a photo of a dog.", "a video of two cats playing"])
    options = cache_decode_options(model, data, modality, image_size=image_size, evaluation=evaluation)
    identity = {
        "model": {
            # the content the towers were built from, not the name or file it came from
            "architecture": architecture_config(model),
            "trunk_sha256": digest or trunk_digest(model),
            "context_length": model.context_length,
            "tokenizer": f"{type(tokenizer).__name__}:{hashlib.sha256(probe.numpy().tobytes()).hexdigest()[:16]}",
        },
        "preprocessing": {**json.loads(json.dumps(dataclasses.asdict(options))), "resize_mode": RESIZE_MODE,
                          "frame_sampling": FRAME_SAMPLING},
        "precision": PRECISIONS[precision],
        "versions": {"torch": torch.__version__, "open_clip": open_clip.__version__},
        # float16 storage rounds every stored value (absent for float32, so that older caches stay valid)
        **({"storage": data.feature_cache_dtype} if data.feature_cache_dtype != "float32" else {}),
    }
    return make_cache(identity, data.feature_cache_dir)


def cache_decode_options(model: torch.nn.Module, data: DataConfig, modality: str, *, image_size: int | None = None,
                         evaluation: bool = False) -> DecodeOptions:
    """How a cache's samples are decoded: as the training stream decodes them, or (``evaluation``) exactly."""
    size = image_size or (data.image_size if data.image_size is not None else model.image_size)
    return DecodeOptions(frames=MODALITY_REGISTRY[modality].clip_length(data.frames), image_size=size,
                         image_mean=tuple(model.image_mean), image_std=tuple(model.image_std), modality=modality,
                         fast=bool(data.fast_decode) and not evaluation)


def architecture_config(model: torch.nn.Module) -> dict[str, Any]:
    """The open_clip architecture config ``model`` was built from (``create_model`` keeps it on the model)."""
    config = getattr(model, "architecture_config", None)
    if config is None:
        raise ValueError(f"{type(model).__name__} has no architecture_config: build it with "
                         "mmsphere.models.create_model")
    return config


def config_caches(model: torch.nn.Module, config: Any) -> tuple[dict[str, FeatureCache], FeatureCache | None]:
    """The caches a run reads: per modality of its training (and meta) sources, and its validation set's."""
    digest = trunk_digest(model)
    sources = list(config.data.train) + ([config.data.meta] if config.meta.enabled and config.data.meta else [])
    train = {modality: cache_for(model, config.data, modality, digest=digest, precision=config.train.precision)
             for modality in sorted({source.modality for source in sources})}
    val = None
    if config.data.val is not None:
        # validation decodes exactly, at the model's own input size, in float32 (mmsphere.train.loop.validate)
        val = cache_for(model, config.data, config.data.val.modality, digest=digest, image_size=model.image_size,
                        evaluation=True)
    return train, val


def cache_jobs(config: Any, train: dict[str, FeatureCache],
               val: FeatureCache | None) -> list[tuple[str, FeatureCache, str]]:
    """(source name, cache, shard URLs) of every source a run reads: train, meta (when enabled) and val."""
    jobs = [(source.name or f"train{index}", train[source.modality], source.urls)
            for index, source in enumerate(config.data.train)]
    if config.meta.enabled and config.data.meta is not None:
        jobs.append((config.data.meta.name or "meta", train[config.data.meta.modality], config.data.meta.urls))
    if val is not None:
        jobs.append((config.data.val.name or "val", val, config.data.val.urls))
    return jobs


def build_config_caches(model: torch.nn.Module, config: Any, *, rank: int = 0, world_size: int = 1,
                        progress: bool = True) -> tuple[dict[str, FeatureCache], FeatureCache | None]:
    """Build what is missing of every cache a run reads (this process's share of the shards); returns the caches."""
    check_cacheable(model, config.data)
    train, val = config_caches(model, config)
    for name, cache, urls in cache_jobs(config, train, val):
        report = build_feature_cache(model, cache, urls, batch_size=config.train.batch_size, rank=rank,
                                     world_size=world_size, progress=progress, description=f"feature cache {name}")
        if report.shards_built:
            logger.info("feature cache %s: encoded %d shard(s), %d samples (%d already cached; skipped: %s) into %s",
                        name, report.shards_built, report.samples, report.shards_found, report.skipped or "none",
                        cache.directory_for(check_shards(urls, name)[0]))
    return train, val


def decode_options(cache: FeatureCache) -> DecodeOptions:
    """How the samples behind ``cache`` are decoded (its identity says)."""
    preprocessing = cache.identity["preprocessing"]
    values = {field.name: preprocessing[field.name] for field in dataclasses.fields(DecodeOptions)}
    return DecodeOptions(**{name: tuple(value) if isinstance(value, list) else value for name, value in values.items()})


@torch.no_grad()
def build_feature_cache(
    model: torch.nn.Module,
    cache: FeatureCache,
    urls: str | Sequence[str],
    *,
    batch_size: int = 64,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
    description: str = "feature cache",
) -> BuildReport:
    """Encode every shard of ``urls`` not yet in ``cache`` (this process: every ``world_size``-th from ``rank``)."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    shards = check_shards(urls, description)
    report = BuildReport()
    mine = shards[rank::world_size]
    todo = []
    for url in mine:
        problem = cache.problem(url)
        if problem is not None and problem != "missing":
            logger.warning("feature cache: %s %s; building it again", cache.path_for(url), problem)
        if problem is not None:
            todo.append(url)
    report.shards_found = len(mine) - len(todo)
    if not todo:
        return report
    if any(not is_local(url) for url in todo):
        logger.warning("feature cache %s: remote shards are known by their URL only; after rewriting one, delete "
                       "its feature file", description)
    was_training = model.training
    model.eval()
    try:
        bar = tqdm(todo, desc=description, unit="shard", disable=not progress, dynamic_ncols=True)
        for url in bar:
            cache.write_description(url)
            source = source_identity(url)  # before reading: a shard rewritten meanwhile is stale next time
            with _autocast(model, cache.identity["precision"]):
                features, counts = _encode_shard(model, url, decode_options(cache), batch_size)
            if cache.identity.get("storage") == "float16":
                features = dataclasses.replace(features, trunk=features.trunk.half(),
                                               text_trunk=features.text_trunk.half())
            write_shard_features(cache.path_for(url), features, cache.fingerprint, source)
            report.shards_built += 1
            report.samples += features.trunk.shape[0]
            for reason, count in counts.items():
                report.skipped[reason] = report.skipped.get(reason, 0) + count
            bar.set_postfix(samples=report.samples)
    finally:
        model.train(was_training)
    return report


def _encode_shard(model: torch.nn.Module, url: str, options: DecodeOptions,
                  batch_size: int) -> tuple[ShardFeatures, dict[str, int]]:
    """The features of one shard and its skip counts (reader and decode)."""
    reader_counter, decode_counter = SkipCounter(), SkipCounter()
    records: list[dict] = []
    trunks: list[torch.Tensor] = []
    masks: list[torch.Tensor] = []
    captions_in_order: list[str] = []
    offsets = [0]
    raws = read_tar_samples([url], reader_counter)
    while chunk := list(itertools.islice(raws, batch_size)):
        decoded = []
        for raw in chunk:
            try:
                sample = decode_sample(raw, options)
            except DecodeError as error:
                decode_counter.record(error.reason, key=raw.key, url=url, detail=error.detail)
                records.append({"key": raw.key, "skip": error.reason, "detail": error.detail})
                continue
            records.append({"key": sample.key, "row": len(offsets) - 1 + len(decoded),
                            "captions": list(sample.captions), "group": sample.group})
            decoded.append(sample)
        for sample in decoded:
            captions_in_order.extend(sample.captions)
            offsets.append(offsets[-1] + len(sample.captions))
        if decoded:
            trunks.append(_visual_trunk(model, decoded, options.modality))
            masks.append(torch.stack([sample.frame_mask for sample in decoded]))
    distinct = list(dict.fromkeys(captions_in_order))
    row_of = {caption: index for index, caption in enumerate(distinct)}
    text_trunk = torch.cat([model.text_trunk_features(model.tokenizer(distinct[start:start + batch_size]).to(
        _device_of(model))).float().cpu() for start in range(0, len(distinct), batch_size)]) if distinct else None
    temporal = MODALITY_REGISTRY[options.modality].temporal
    if text_trunk is None:
        # a shard with no decodable sample: empty tensors of the right rank keep the file well-formed
        text_trunk, trunk = torch.zeros(0, 1), torch.zeros(0, 1)
        frame_mask = torch.zeros(0, options.frames, dtype=torch.bool) if temporal else None
    else:
        trunk = torch.cat(trunks)
        frame_mask = torch.cat(masks) if temporal else None
    features = ShardFeatures(
        url=url, records=records, reader_skips=dict(reader_counter.totals), trunk=trunk, frame_mask=frame_mask,
        text_trunk=text_trunk, caption_rows=torch.tensor([row_of[caption] for caption in captions_in_order],
                                                         dtype=torch.long),
        caption_offsets=torch.tensor(offsets, dtype=torch.long))
    counts = dict(reader_counter.totals)
    for reason, count in decode_counter.totals.items():
        counts[reason] = counts.get(reason, 0) + count
    return features, counts


def _visual_trunk(model: torch.nn.Module, samples: list, modality: str) -> torch.Tensor:
    # stacked as the collates stack a batch, so the trunks see exactly what an uncached step feeds them
    media = collate_eval(samples, modality=modality, skipped={}).media.to(_device_of(model))
    if not MODALITY_REGISTRY[modality].temporal:
        return model.image_trunk_features(media).float().cpu()
    frames = media
    batch, length = frames.shape[:2]
    # every frame slot, padded ones too: the uncached video path encodes them as well (the mask drops them)
    trunk = model.image_trunk_features(frames.flatten(0, 1)).float().cpu()
    return trunk.view(batch, length, *trunk.shape[1:])


def _autocast(model: torch.nn.Module, precision: str) -> torch.autocast:
    """The trunks' precision while building: a training step's autocast, or float32 with any outer autocast off."""
    dtype = AUTOCAST_DTYPES[precision]
    return torch.autocast(device_type=_device_of(model).type, dtype=dtype, enabled=dtype is not None)


def _device_of(model: torch.nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")
