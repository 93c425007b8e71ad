"""Batching: decoded samples -> one :class:`~mmsphere.data.batch.Batch`, the only place a batch's layout is decided.

The collates stack the samples' media (images ``[B, 3, H, W]``, frames ``[B, T, 3, H, W]``, or a
feature cache's trunk activations), tokenise the paired captions, and turn ``loss.positives`` into
group ids (:func:`resolve_group_ids`): nothing after the collate re-derives any of it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import torch

from mmsphere.data.batch import Batch
from mmsphere.data.cached import CachedSample
from mmsphere.data.modalities import MODALITY_REGISTRY
from mmsphere.data.samples import Sample
from mmsphere.errors import MmsphereError

Tokenizer = Callable[[list[str]], torch.Tensor]
POSITIVES = ("diagonal", "group")


def collate_train(
    samples: list[Sample] | list[CachedSample],
    captions: list[str],
    choices: list[int],
    *,
    source: str,
    modality: str,
    tokenizer: Tokenizer,
    skipped: dict[str, int],
    positives: str = "diagonal",
    tokenize_cached: bool = False,
) -> Batch:
    """Stack decoded samples into a training batch with the caption drawn for each, tokenised (or its text trunk
    features; ``tokenize_cached``: and its tokens, for a text tower that resumes at a block)."""
    keys = [sample.key for sample in samples]
    groups = [sample.group for sample in samples]
    cached = bool(samples) and isinstance(samples[0], CachedSample)
    return Batch(
        modality=modality,
        media=_stack_media(samples, modality, cached),
        frame_mask=torch.stack([sample.frame_mask for sample in samples]),
        keys=keys,
        source=source,
        text=tokenizer(captions) if not cached or tokenize_cached else None,
        captions=[list(sample.captions) for sample in samples],
        caption=list(captions),
        groups=groups,
        group_ids=resolve_group_ids(positives, groups, keys, source),
        cached=cached,
        text_trunk=torch.stack([sample.caption_trunk[choice] for sample, choice in zip(samples, choices)])
        if cached else None,
        skipped=skipped,
    )


def collate_eval(samples: list[Sample] | list[CachedSample], *, modality: str, skipped: dict[str, int],
                 source: str = "") -> Batch:
    """Stack decoded samples into an evaluation batch, keeping every caption (untokenised)."""
    cached = bool(samples) and isinstance(samples[0], CachedSample)
    return Batch(
        modality=modality,
        media=_stack_media(samples, modality, cached),
        frame_mask=torch.stack([sample.frame_mask for sample in samples]),
        keys=[sample.key for sample in samples],
        source=source,
        captions=[list(sample.captions) for sample in samples],
        groups=[sample.group for sample in samples],
        cached=cached,
        caption_trunk=[sample.caption_trunk for sample in samples] if cached else [],
        skipped=skipped,
    )


def _stack_media(samples: Sequence[Sample | CachedSample], modality: str, cached: bool) -> torch.Tensor:
    """The modality's collate (images ``[B, 3, H, W]``, frames ``[B, T, 3, H, W]``), or the cached trunks."""
    if cached:
        return torch.stack([sample.trunk for sample in samples])
    return MODALITY_REGISTRY[modality].stack([sample.frames for sample in samples])


def resolve_group_ids(positives: str, groups: list[str], keys: list[str], source: str) -> torch.Tensor | None:
    """Integer group ids ``[B]`` for ``loss.positives: group``; None for ``diagonal`` (each sample its own positive).

    A sample's group is the ``group`` of its JSON, else its media key; names become 63-bit integers
    by a stable hash (BLAKE2b), equal on every rank and in every loader worker.
    """
    if positives not in POSITIVES:
        raise ValueError(f"positives={positives!r} must be one of {POSITIVES}")
    if positives == "diagonal":
        return None
    if all(group == key for group, key in zip(groups, keys)):
        # no sample of the batch names a group: the source has none, and every sample would be its own
        raise MmsphereError(f"loss.positives=group, but the samples of data source {source!r} carry no "
                            f"group ids (a 'group' field in their .json; make-shards writes one from a 'group' "
                            f"column): every sample would be a group of its own")
    ids = [int.from_bytes(hashlib.blake2b(str(group).encode(), digest_size=8).digest(), "little") >> 1
           for group in groups]
    return torch.tensor(ids, dtype=torch.long)
