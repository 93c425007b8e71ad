"""The one typed batch every stream hands out: media with its modality, texts, ids, group ids, source.

A :class:`Batch` is made once, by the collate (:mod:`mmsphere.data.batching`), and read by field
everywhere after: nothing downstream looks at tensor shapes or key names to find out which tensor is
frames or images, where the ids are, or which samples are positives of each other. The group ids
are already resolved from ``loss.positives`` (None: the diagonal, each sample its own positive).
See ARCHITECTURE.md for the data path (shard -> decode -> Batch -> Task -> objective).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from mmsphere.data.modalities import MODALITY_REGISTRY


@dataclass
class Batch:
    """One homogeneous batch of ``B`` samples: one source, one modality.

    ``media``: images ``[B, 3, H, W]`` or frames ``[B, T, 3, H, W]`` (with ``frame_mask [B, T]``); a
    feature-cache batch (``cached``) holds the trunk activations instead: ``[B, ...]`` for images,
    ``[B, T, ...]`` for videos. ``text``: token ids ``[B, L]`` of the caption each sample is paired
    with (training), or None (evaluation: every caption in ``captions``); ``text_trunk [B, ...]``
    replaces it in a cached training batch, ``caption_trunk`` (one ``[n_captions, ...]`` per sample)
    in a cached evaluation batch. ``group_ids [B]``: integer ids, equal for samples that are positives
    of each other (``loss.positives: group``), None for the diagonal. ``valid [B]``: the samples that
    count (every row a stream hands out today).
    """

    modality: str
    media: torch.Tensor
    frame_mask: torch.Tensor | None = None  # None: every frame valid
    keys: list[str] = field(default_factory=list)  # empty: the rows' indices
    source: str = ""
    text: torch.Tensor | None = None
    captions: list[list[str]] = field(default_factory=list)  # every caption of each sample
    caption: list[str] = field(default_factory=list)  # training: the caption ``text`` holds, per sample
    groups: list[str] = field(default_factory=list)  # the ``group`` of each sample's JSON, else its key
    group_ids: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    cached: bool = False
    text_trunk: torch.Tensor | None = None
    caption_trunk: list[torch.Tensor] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)  # samples skipped since the previous batch, by reason
    # how many raw samples the producing loader worker has taken from each source (resume)
    consumed: list[int] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.modality not in MODALITY_REGISTRY:
            raise ValueError(f"Batch: {MODALITY_REGISTRY.check(self.modality, 'modality')}")
        if self.frame_mask is None:
            frames = self.media.shape[1] if MODALITY_REGISTRY[self.modality].temporal else 1
            self.frame_mask = torch.ones(len(self), frames, dtype=torch.bool, device=self.media.device)
        if not self.keys:
            self.keys = [str(row) for row in range(len(self))]
        if self.valid is None:
            self.valid = torch.ones(len(self), dtype=torch.bool, device=self.media.device)

    def __len__(self) -> int:
        return int(self.media.shape[0])

    def to(self, device: torch.device | str) -> Batch:
        """The same batch with its tensors on ``device`` (a copy of the dataclass; lists shared)."""
        moved = {name: _to(getattr(self, name), device)
                 for name in ("media", "frame_mask", "text", "group_ids", "valid", "text_trunk")}
        return dataclasses.replace(self, **moved)

    def media_inputs(self) -> dict[str, torch.Tensor]:
        """The visual keyword arguments of the dual encoder (``images``, ``frames`` + ``frame_mask`` or their trunks)."""
        return MODALITY_REGISTRY[self.modality].inputs(self.media, self.frame_mask, cached=self.cached)

    def encoder_inputs(self) -> dict[str, torch.Tensor]:
        """The dual encoder's keyword arguments for this batch: its media and the paired texts' tokens (or trunks)."""
        if self.cached:
            if self.text_trunk is None:
                raise ValueError("a cached batch without text_trunk has no encoder inputs (an evaluation batch?)")
            tokens = {"text": self.text} if self.text is not None else {}  # a text tower resumed at a block
            return {"text_trunk": self.text_trunk, **tokens, **self.media_inputs()}
        if self.text is None:
            raise ValueError("a batch without text tokens has no encoder inputs (an evaluation batch?)")
        return {"text": self.text, **self.media_inputs()}


def _to(value: torch.Tensor | None, device: torch.device | str) -> torch.Tensor | None:
    return value.to(device, non_blocking=True) if value is not None else None
