"""Batched encoding of an evaluation set: every video (or image) once, every caption once.

The result keeps the caption → video mapping that the retrieval metrics need when a video has
several captions (ARCHITECTURE.md, Evaluation conventions).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from mmsphere.config import MmsphereError
from mmsphere.data.batch import Batch

logger = logging.getLogger(__name__)


@dataclass
class EncodedEvalSet:
    """Unit-norm features of an evaluation set: ``V`` videos (or images) and their ``C`` captions."""

    keys: list[str]  # [V] sample keys
    image_features: torch.Tensor  # [V, D] float32, CPU
    captions: list[str]  # [C], grouped by video in the order of ``keys``
    text_features: torch.Tensor  # [C, D] float32, CPU
    caption_to_video: np.ndarray  # [C] int64: the video each caption describes
    modality: str  # "video" | "image"

    @property
    def captions_of_video(self) -> list[list[int]]:
        """For every video, the indices of its captions (the v2t ground truth)."""
        starts = np.searchsorted(self.caption_to_video, np.arange(len(self.keys) + 1))
        return [list(range(start, stop)) for start, stop in zip(starts[:-1], starts[1:])]

    @property
    def caption_keys(self) -> list[str]:
        """A key per caption: ``VIDEO_KEY#n`` for the n-th caption of a video."""
        counts: dict[int, int] = {}
        keys = []
        for video in self.caption_to_video.tolist():
            keys.append(f"{self.keys[video]}#{counts.get(video, 0)}")
            counts[video] = counts.get(video, 0) + 1
        return keys


@torch.inference_mode()
def encode_eval_set(
    model: torch.nn.Module,
    batches: Iterable[Batch],
    *,
    text_batch_size: int = 256,
    progress: bool = True,
    description: str = "encoding",
) -> EncodedEvalSet:
    """Encode evaluation batches (``mmsphere.data.build_eval_loader`` layout) with a dual encoder.

    Each batch is a :class:`~mmsphere.data.Batch` holding every caption of each sample; its media go
    through the dual encoder's ``encode_visual`` as in training.
    """
    if text_batch_size < 1:
        raise ValueError(f"text_batch_size={text_batch_size} must be >= 1")
    was_training = model.training
    model.eval()
    device = _device_of(model)
    keys: list[str] = []
    seen: set[str] = set()
    captions: list[str] = []
    caption_to_video: list[int] = []
    image_features: list[torch.Tensor] = []
    caption_trunks: list[torch.Tensor] = []  # from a feature cache: the text trunk features of ``captions``
    modality = None
    try:
        for batch in tqdm(batches, desc=f"{description} (visual)", unit="batch", disable=not progress):
            batch_modality = batch.modality
            if modality is None:
                modality = batch_modality
            elif batch_modality != modality:
                raise MmsphereError(f"the evaluation set mixes modalities: {modality!r} and {batch_modality!r}")
            features = _encode_visual(model, batch, device)
            for key, sample_captions, row in zip(batch.keys, batch.captions, features):
                if key in seen:
                    raise MmsphereError(f"sample key {key!r} appears twice in the evaluation set")
                if not sample_captions:
                    raise MmsphereError(f"sample {key!r} has no caption; every evaluated item needs one")
                if not torch.isfinite(row).all():
                    raise MmsphereError(
                        f"the model produced non-finite features for sample {key!r}; its weights may hold NaN/Inf"
                    )
                seen.add(key)
                caption_to_video.extend([len(keys)] * len(sample_captions))
                keys.append(key)
                captions.extend(sample_captions)
            caption_trunks.extend(batch.caption_trunk)
            image_features.append(features)
        if not keys:
            raise MmsphereError("the evaluation set produced no sample (empty, or every sample was skipped)")
        if caption_trunks:
            text_trunk = torch.cat(caption_trunks)
            # a text tower resumed at a block reads the token ids too (its pooling); a head alone does not
            blocks = getattr(getattr(model, "config", None), "trainable_blocks", None)
            text_features = torch.cat([model.encode_text_trunk(
                text_trunk[start:start + text_batch_size].to(device),
                model.tokenizer(captions[start:start + text_batch_size]).to(device) if blocks else None)
                .float().cpu() for start in range(0, len(text_trunk), text_batch_size)])
        else:
            text_features = encode_texts(model, captions, batch_size=text_batch_size, progress=progress,
                                         description=f"{description} (text)")
    finally:
        model.train(was_training)
    return EncodedEvalSet(
        keys=keys,
        image_features=torch.cat(image_features),
        captions=captions,
        text_features=text_features,
        caption_to_video=np.asarray(caption_to_video, dtype=np.int64),
        modality=modality,
    )


def _device_of(model: torch.nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _encode_visual(model: torch.nn.Module, batch: Batch, device: torch.device) -> torch.Tensor:
    return model.encode_visual(**batch.to(device).media_inputs()).float().cpu()


@torch.inference_mode()
def encode_texts(model: torch.nn.Module, texts: list[str], *, batch_size: int = 256, progress: bool = False,
                 description: str = "encoding text") -> torch.Tensor:
    """Unit-norm text features ``[N, D]`` (float32, CPU) of ``texts``, tokenised with ``model.tokenizer``."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if not texts:
        raise ValueError("encode_texts needs at least one text")
    device = _device_of(model)
    chunks = list(_batched(texts, batch_size))
    features = []
    for chunk in tqdm(chunks, desc=description, unit="batch", disable=not progress):
        text_features = model.encode_text(model.tokenizer(chunk).to(device)).float().cpu()
        finite = torch.isfinite(text_features).all(dim=1)
        if not finite.all():
            caption = chunk[int(torch.nonzero(~finite)[0])]
            raise MmsphereError(
                f"the model produced non-finite features for text {caption!r}; its weights may hold NaN/Inf"
            )
        features.append(text_features)
    return torch.cat(features)


def _batched(items: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
