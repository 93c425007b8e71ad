"""The library entry of retrieval evaluation: encode a set, score both directions, measure the geometry.

``evaluate_retrieval(model, "shards/val-{000000..000003}.tar")`` is everything
``mmsphere eval-retrieval`` does short of printing; the CLI is a thin parser over it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmsphere.data.feature_files import FeatureCache
from mmsphere.config import MmsphereError
from mmsphere.data import build_eval_loader
from mmsphere.data.stats import skipped_counts
from mmsphere.data.modalities import MODALITY_REGISTRY
from mmsphere.eval.completeness import ALLOW_FLAG, IncompleteDataError, lost_samples, shard_fingerprint
from mmsphere.eval.encode import EncodedEvalSet, encode_eval_set
from mmsphere.eval.geometry import geometry_diagnostics
from mmsphere.eval.protocols import UNIFORM_SAMPLING
from mmsphere.eval.report import sibling, write_json
from mmsphere.eval.retrieval import TIE_RULE, dual_softmax, retrieval_metrics

logger = logging.getLogger(__name__)

DSL_DEFINITION = (
    "dual softmax (Cheng et al. 2021) at inference: sim * softmax(sim / T, over the queries), "
    "post-processing that uses the whole query set; reported separately from the plain scores"
)


def evaluate_retrieval(
    model: torch.nn.Module,
    data: str | Iterable[dict[str, Any]] | EncodedEvalSet,
    *,
    modality: str = "video",
    frames: int = 12,
    batch_size: int = 16,
    workers: int = 0,
    dsl: bool = False,
    dsl_temperature: float | None = None,
    chunk_size: int | None = None,
    save_sim: str | os.PathLike | None = None,
    progress: bool = True,
    feature_cache: FeatureCache | None = None,
    allow_missing: bool = False,
) -> dict[str, Any]:
    """Text→video and video→text retrieval metrics, geometry diagnostics and set sizes.

    Ranks and ties as ARCHITECTURE.md, Evaluation conventions says.

    ``data``: shard URLs (decoded exactly by ``mmsphere.data.build_eval_loader``), an iterable of
    evaluation batches, or an already encoded set. ``dsl`` adds dual-softmax rows
    (``dsl_temperature`` ``None`` = 1 / the model's logit scale). ``save_sim`` writes the
    ``[captions, videos]`` similarity matrix (``.npy``) and ``<stem>.keys.json`` beside it.
    ``feature_cache``: read the shards' trunk features from it instead of decoding (frozen trunks).
    Samples lost while reading shards or batches (undecodable, no caption, a broken shard) stop the
    evaluation before scoring unless ``allow_missing``; then ``data`` says it is a subset.
    Returns a JSON-ready dict.
    """
    if save_sim is not None and Path(save_sim).suffix != ".npy":
        raise ValueError(f"save_sim={str(save_sim)!r} must end in .npy (numpy's format, np.load reads it)")
    skipped_before = _skipped_counts()
    if isinstance(data, EncodedEvalSet):
        encoded = data
    else:
        batches = _eval_batches(model, data, modality=modality, frames=frames, batch_size=batch_size, workers=workers,
                                feature_cache=feature_cache)
        encoded = encode_eval_set(model, batches, progress=progress)
    skipped = {reason: count - skipped_before.get(reason, 0) for reason, count in _skipped_counts().items()}
    skipped = {reason: count for reason, count in skipped.items() if count}
    lost = lost_samples(skipped)
    if lost and not allow_missing:
        where = data if isinstance(data, str) else "the evaluation batches"
        raise IncompleteDataError(
            f"{sum(lost.values())} samples of {where} were lost while reading them ({lost}), stopped before scoring "
            f"(the log names the first ones); repair the shards, or pass {ALLOW_FLAG} to evaluate the "
            f"{len(encoded.keys)} read (every output then says it is a subset)")
    if dsl and dsl_temperature is None:
        dsl_temperature = 1.0 / float(model.log_logit_scale.detach().exp())
    results, sim = score_retrieval(encoded, dsl=dsl, dsl_temperature=dsl_temperature, chunk_size=chunk_size)
    results["data"] = {
        "modality": encoded.modality,
        "num_videos": len(encoded.keys),
        "num_captions": len(encoded.captions),
        "skipped": skipped,
    }
    if not isinstance(data, EncodedEvalSet):
        lost_total = sum(lost.values())
        results["data"].update(n_listed=len(encoded.keys) + lost_total, n_evaluated=len(encoded.keys),
                               subset=bool(lost))
        if isinstance(data, str):
            results["data"].update(media=shard_fingerprint(data),
                                   frame_sampling=UNIFORM_SAMPLING if MODALITY_REGISTRY[encoded.modality].temporal else "one image")
        if lost:
            results["data"]["missing"] = {"count": lost_total, "by_reason": lost, "first": [], "file": None}
    if save_sim is not None:
        results["saved_similarity"] = save_similarity(sim, encoded, save_sim)
    return results


def score_retrieval(
    encoded: EncodedEvalSet,
    *,
    dsl: bool = False,
    dsl_temperature: float | None = None,
    chunk_size: int | None = None,
) -> tuple[dict[str, Any], torch.Tensor]:
    """Metrics of an encoded set in both directions (+ DSL rows when asked); returns them and the t2v matrix."""
    if len(encoded.keys) < 2:
        raise MmsphereError(f"retrieval needs at least 2 videos or images, the set has {len(encoded.keys)}")
    text_to_video = encoded.text_features @ encoded.image_features.T  # [C, V], fp32
    video_to_text = text_to_video.T.contiguous()
    captions_of_video = encoded.captions_of_video
    metrics = {
        "t2v": retrieval_metrics(text_to_video, encoded.caption_to_video, chunk_size=chunk_size),
        "v2t": retrieval_metrics(video_to_text, captions_of_video, chunk_size=chunk_size),
    }
    results: dict[str, Any] = {"metrics": metrics}
    if dsl:
        if dsl_temperature is None:
            raise ValueError("dsl=True needs dsl_temperature")
        metrics["t2v_dsl"] = retrieval_metrics(dual_softmax(text_to_video, dsl_temperature, chunk_size=chunk_size),
                                               encoded.caption_to_video, chunk_size=chunk_size)
        metrics["v2t_dsl"] = retrieval_metrics(dual_softmax(video_to_text, dsl_temperature, chunk_size=chunk_size),
                                               captions_of_video, chunk_size=chunk_size)
        results["dsl"] = {"temperature": dsl_temperature, "definition": DSL_DEFINITION}
    results.update(
        tie_rule=TIE_RULE,
        num_queries={"t2v": len(encoded.captions), "v2t": len(encoded.keys)},
        num_gallery={"t2v": len(encoded.keys), "v2t": len(encoded.captions)},
        geometry=geometry_diagnostics(encoded.image_features, encoded.text_features, encoded.caption_to_video),
    )
    return results, text_to_video


def save_similarity(sim: torch.Tensor, encoded: EncodedEvalSet, path: str | os.PathLike) -> dict[str, str]:
    """Write the ``[captions, videos]`` matrix to ``path`` (``.npy``) and its row/column keys to ``<stem>.keys.json``."""
    path = Path(path)
    if path.suffix != ".npy":
        raise ValueError(f"save_sim={str(path)!r} must end in .npy (numpy's format, np.load reads it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, sim.numpy())
    keys_path = write_json(sibling(path, ".keys.json"), {
        "rows": "text queries (t2v): one per caption; query_keys[i] = VIDEO_KEY#n for the n-th caption",
        "columns": "gallery videos/images (gallery_keys)",
        "query_keys": encoded.caption_keys,
        "captions": encoded.captions,
        "caption_to_video": encoded.caption_to_video.tolist(),
        "gallery_keys": encoded.keys,
    })
    return {"similarity": str(path), "keys": str(keys_path)}


def evaluate_retrieval_loader(
    model: torch.nn.Module,
    urls: str,
    *,
    modality: str = "video",
    frames: int = 12,
    batch_size: int = 16,
    workers: int = 0,
    progress: bool = False,
    feature_cache: FeatureCache | None = None,
) -> dict[str, float]:
    """Flat ``{"t2v/R@1": ..., "geometry/alignment": ...}`` metrics of a shard set, for training-time validation."""
    # training-time validation never stops a run on a bad sample: it is counted and reported
    # (ARCHITECTURE.md, Bad input)
    results = evaluate_retrieval(model, urls, modality=modality, frames=frames, batch_size=batch_size,
                                 workers=workers, progress=progress, feature_cache=feature_cache, allow_missing=True)
    flat = {f"{direction}/{name}": value for direction, values in results["metrics"].items()
            for name, value in values.items()}
    flat.update({f"geometry/{name}": value for name, value in results["geometry"].items()})
    return flat


def _eval_batches(model: torch.nn.Module, data: str | Iterable[dict[str, Any]], *, modality: str, frames: int,
                  batch_size: int, workers: int, feature_cache: FeatureCache | None = None) -> Iterable[dict[str, Any]]:
    if not isinstance(data, str):
        return data
    if modality not in MODALITY_REGISTRY:
        raise ValueError(MODALITY_REGISTRY.check(modality, "modality"))
    return build_eval_loader(
        data,
        modality,
        frames=MODALITY_REGISTRY[modality].clip_length(frames),
        image_size=model.image_size,
        image_mean=model.image_mean,
        image_std=model.image_std,
        batch_size=batch_size,
        workers=workers,
        feature_cache=feature_cache,
    )


def _skipped_counts() -> dict[str, int]:
    return skipped_counts()
