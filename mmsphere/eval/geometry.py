"""Geometry of a learned embedding on the hypersphere, reported beside the retrieval metrics.

Alignment and uniformity follow Wang & Isola (ICML 2020), the modality gap Liang et al.
(NeurIPS 2022, "Mind the Gap"). Everything that needs all pairs is computed chunk by chunk, so an
evaluation set of tens of thousands of captions never materialises an ``N × N`` matrix.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from mmsphere.eval.retrieval import ArrayLike
from mmsphere.losses.functional import alignment

# the pairwise pass keeps about four fp64 temporaries of one chunk alive: 2**22 elements each
# bounds it near 128 MB whatever the set size
CHUNK_ELEMENTS = 1 << 22

GEOMETRY_KEYS = (
    "alignment",
    "uniformity_image",
    "uniformity_text",
    "uniformity_union",
    "modality_gap",
    "mean_positive_angle",
    "mean_negative_angle",
)


def geometry_diagnostics(
    image_features: ArrayLike,
    text_features: ArrayLike,
    text_to_image: ArrayLike | None = None,
    *,
    t: float = 2.0,
    chunk_size: int | None = None,
) -> dict[str, float]:
    """Alignment, uniformity (per modality and on the union), modality gap and mean angles.

    ``image_features``: ``[V, D]`` (one row per image or video), ``text_features``: ``[C, D]``,
    ``text_to_image``: ``[C]`` index of the image each caption describes (``None``: caption i
    describes image i). Angles are in degrees; the negative angle averages every non-matching
    (image, caption) pair.
    """
    images = checked_features(image_features, "image_features")
    texts = checked_features(text_features, "text_features")
    if images.shape[1] != texts.shape[1]:
        raise ValueError(
            f"image_features are {images.shape[1]}-dimensional but text_features are {texts.shape[1]}-dimensional"
        )
    if images.shape[0] < 2:
        raise ValueError(f"geometry needs at least 2 images or videos, got {images.shape[0]}")
    pairs = _pairs(text_to_image, texts.shape[0], images.shape[0])

    positive_cosine = (images[pairs] * texts).sum(dim=1)
    diagnostics = {
        "alignment": float(alignment(images[pairs], texts)),
        "uniformity_image": chunked_uniformity(images, t=t, chunk_size=chunk_size),
        "uniformity_text": chunked_uniformity(texts, t=t, chunk_size=chunk_size),
        "uniformity_union": chunked_uniformity(torch.cat([images, texts]), t=t, chunk_size=chunk_size),
        "modality_gap": float(torch.linalg.vector_norm(images.mean(dim=0) - texts.mean(dim=0))),
        "mean_positive_angle": float(torch.rad2deg(_angle(positive_cosine)).mean()),
    }
    all_pairs_angle = _sum_of_angles(texts, images, chunk_size)
    negative_count = texts.shape[0] * images.shape[0] - texts.shape[0]
    positive_angle_sum = float(_angle(positive_cosine).sum())
    diagnostics["mean_negative_angle"] = math.degrees((all_pairs_angle - positive_angle_sum) / negative_count)
    return diagnostics


def chunked_uniformity(features: ArrayLike, t: float = 2.0, *, chunk_size: int | None = None) -> float:
    """``log mean_{i<j} exp(-t‖x_i − x_j‖²)`` (Wang & Isola 2020) in ``O(chunk × N)`` memory."""
    features = checked_features(features, "features")
    count = features.shape[0]
    if count < 2:
        raise ValueError(f"uniformity needs at least 2 feature rows, got {count}")
    if not t > 0:
        raise ValueError(f"t={t} must be > 0")
    chunk_size = _chunk_rows(chunk_size, count)
    squared_norms = (features.double() ** 2).sum(dim=1)
    total = torch.tensor(-math.inf, dtype=torch.float64)
    for start in range(0, count - 1, chunk_size):
        stop = min(start + chunk_size, count - 1)
        # only the pairs i < j: row i meets the columns after it
        columns = features[start + 1 :]
        inner = (features[start:stop] @ columns.T).double()
        squared = (squared_norms[start:stop, None] + squared_norms[None, start + 1 :] - 2 * inner).clamp_min(0)
        rows = torch.arange(start, stop)[:, None]
        upper = torch.arange(start + 1, count)[None, :] > rows
        exponent = torch.where(upper, -t * squared, torch.tensor(-math.inf, dtype=torch.float64))
        total = torch.logaddexp(total, torch.logsumexp(exponent.flatten(), dim=0))
    return float(total - math.log(count * (count - 1) / 2))


def checked_features(features: ArrayLike, name: str) -> torch.Tensor:
    """A finite, non-empty ``[N, D]`` float tensor (fp32 unless fp64) or a ``ValueError`` naming it."""
    if isinstance(features, np.ndarray):
        features = torch.from_numpy(np.ascontiguousarray(features))
    if not isinstance(features, torch.Tensor) or not features.is_floating_point():
        raise ValueError(f"{name} must be a floating-point numpy array or torch tensor")
    if features.ndim != 2 or features.shape[0] == 0 or features.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty [N, D] matrix, got shape {tuple(features.shape)}")
    features = features.detach().cpu()
    if features.dtype != torch.float64:
        features = features.float()
    finite = torch.isfinite(features).all(dim=1)
    if not finite.all():
        raise ValueError(f"{name} has non-finite values in row {int(torch.nonzero(~finite)[0])}")
    return features


def _pairs(text_to_image: ArrayLike | None, num_texts: int, num_images: int) -> torch.Tensor:
    if text_to_image is None:
        if num_texts != num_images:
            raise ValueError(
                f"text_to_image=None pairs caption i with image i, but there are {num_texts} captions "
                f"and {num_images} images; pass text_to_image"
            )
        return torch.arange(num_texts)
    pairs = torch.as_tensor(np.asarray(text_to_image.cpu() if isinstance(text_to_image, torch.Tensor) else text_to_image))
    if pairs.ndim != 1 or pairs.numel() != num_texts or pairs.is_floating_point():
        raise ValueError(f"text_to_image must be {num_texts} integer image indices, got shape {tuple(pairs.shape)}")
    if pairs.numel() and (pairs.min() < 0 or pairs.max() >= num_images):
        raise ValueError(f"text_to_image holds an image index outside [0, {num_images})")
    return pairs.long()


def _chunk_rows(chunk_size: int | None, columns: int) -> int:
    if chunk_size is None:
        return max(1, CHUNK_ELEMENTS // columns)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive integer")
    return chunk_size


def _angle(cosine: torch.Tensor) -> torch.Tensor:
    return torch.arccos(cosine.double().clamp(-1.0, 1.0))


def _sum_of_angles(texts: torch.Tensor, images: torch.Tensor, chunk_size: int | None) -> float:
    chunk_size = _chunk_rows(chunk_size, images.shape[0])
    total = 0.0
    for start in range(0, texts.shape[0], chunk_size):
        total += float(_angle(texts[start : start + chunk_size] @ images.T).sum())
    return total
