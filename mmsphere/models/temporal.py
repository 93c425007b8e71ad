"""Temporal heads: pool per-frame features ``[B, T, D]`` into one video feature ``[B, D]``, and their registry.

Both shipped heads follow CLIP4Clip (Luo et al., 2022): ``mean`` is its parameter-free meanP,
``transformer`` its seqTransf (frame position embeddings + a small transformer + a residual to the
frame features, then the masked mean). The caller L2-normalises the frame features before and the
result after.

``model.temporal_head`` names an entry of :data:`TEMPORAL_HEADS`; the config check, the dual
encoder, run directories and exports all look the head up there. Yours is one
:func:`register_temporal_head` call (in a module given to ``loss.imports``; ARCHITECTURE.md,
Extension points)::

    register_temporal_head(TemporalHead("max-pool", lambda settings, width: MaxPoolHead()))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from mmsphere.errors import ConfigError
from mmsphere.registry import Registry

# width // HEAD_WIDTH attention heads when model.temporal_heads is 0, as in CLIP's towers
HEAD_WIDTH = 64


def masked_mean(frame_features: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
    """Mean over the valid frames: ``frame_features [B, T, D]``, ``frame_mask [B, T]`` bool -> ``[B, D]``."""
    # masked_fill rather than a product: a padded frame may hold non-finite values and 0 * inf is nan
    valid = frame_mask.unsqueeze(-1)
    total = frame_features.masked_fill(~valid, 0).sum(dim=1)
    count = frame_mask.sum(dim=1, keepdim=True).clamp(min=1).to(frame_features.dtype)
    return total / count


class MeanTemporalHead(nn.Module):
    """Masked mean over valid frames (CLIP4Clip meanP); no parameters."""

    def forward(self, frame_features: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """``frame_features [B, T, D]``, ``frame_mask [B, T]`` bool -> ``[B, D]`` (not normalised)."""
        return masked_mean(frame_features, frame_mask)


class TransformerTemporalHead(nn.Module):
    """Frame position embeddings + transformer encoder + residual, then masked mean (CLIP4Clip seqTransf).

    The transformer's contribution enters through an output projection initialised to zero, so at
    initialisation the head equals the mean head exactly and training starts from meanP.
    """

    def __init__(self, width: int, layers: int, heads: int, max_frames: int) -> None:
        super().__init__()
        self.width = width
        self.max_frames = max_frames
        self.frame_position_embedding = nn.Parameter(torch.empty(max_frames, width))
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d_model=width,
                nhead=heads,
                dim_feedforward=4 * width,
                dropout=0.0,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            for _ in range(layers)
        )
        self.ln_post = nn.LayerNorm(width)
        self.output_projection = nn.Linear(width, width)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Position embeddings ~ N(0, 0.02²) as in CLIP; zero output projection so the head starts as meanP."""
        nn.init.normal_(self.frame_position_embedding, std=0.02)
        nn.init.zeros_(self.output_projection.weight)
        nn.init.zeros_(self.output_projection.bias)

    def forward(self, frame_features: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """``frame_features [B, T, D]``, ``frame_mask [B, T]`` bool -> ``[B, D]`` (not normalised)."""
        frames = frame_features.shape[1]
        if frames > self.max_frames:
            raise ConfigError(
                f"the transformer temporal head takes at most model.max_frames={self.max_frames} frames, "
                f"got frames of shape {tuple(frame_features.shape)}"
            )
        hidden = frame_features + self.frame_position_embedding[:frames].to(frame_features.dtype)
        padding = ~frame_mask
        for block in self.blocks:
            hidden = block(hidden, src_key_padding_mask=padding)
        residual = self.output_projection(self.ln_post(hidden))
        return masked_mean(frame_features + residual, frame_mask)


def temporal_heads_for(config: TemporalSettings, width: int) -> int:
    """Attention heads of the transformer head: ``model.temporal_heads``, or ``width // 64`` (at least 1)."""
    if config.temporal_heads < 0:
        raise ConfigError(f"model.temporal_heads={config.temporal_heads} must be >= 0 (0 = width // 64)")
    heads = config.temporal_heads or max(1, width // HEAD_WIDTH)
    if width % heads != 0:
        raise ConfigError(
            f"model.temporal_heads={heads} must divide the embedding width {width} of the temporal head"
        )
    return heads


class TemporalSettings(Protocol):
    """What a head's builder may read of the model section (``model.*``)."""

    temporal_head: str
    temporal_layers: int
    temporal_heads: int
    max_frames: int


@dataclass(frozen=True)
class TemporalHead:
    """One temporal head: how to build it from the model section and the feature width, and its frame limit."""

    name: str
    # (model section, width) -> a module mapping frame_features [B, T, D], frame_mask [B, T] to [B, D]
    build: Callable[[TemporalSettings, int], nn.Module]
    bounded_by_max_frames: bool = False  # takes at most model.max_frames frames (frame position embeddings)
    paper: str = ""


TEMPORAL_HEADS: Registry[TemporalHead] = Registry("temporal head", TemporalHead)


def register_temporal_head(head: TemporalHead) -> TemporalHead:
    """Make ``head`` available as ``model.temporal_head: <head.name>``."""
    return TEMPORAL_HEADS.register(head.name, head)


def build_temporal_head(config: TemporalSettings, width: int) -> nn.Module:
    """The temporal head named by ``model.temporal_head`` over features of size ``width``."""
    return TEMPORAL_HEADS.lookup(config.temporal_head).build(config, width)


def check_temporal_head(config: TemporalSettings, frames: int | None = None) -> list[str]:
    """Problems of the model section's temporal settings (and of ``frames`` per video, if given), one line each."""
    unknown = TEMPORAL_HEADS.check(config.temporal_head, "model.temporal_head")
    if unknown is not None:
        return [unknown]
    problems = []
    if config.temporal_layers < 1:
        problems.append(f"model.temporal_layers={config.temporal_layers} must be >= 1")
    if config.max_frames < 1:
        problems.append(f"model.max_frames={config.max_frames} must be >= 1")
    if frames is not None and frames > config.max_frames and TEMPORAL_HEADS[config.temporal_head].bounded_by_max_frames:
        problems.append(f"data.frames={frames} exceeds model.max_frames={config.max_frames}")
    return problems


def _mean_head(config: TemporalSettings, width: int) -> nn.Module:
    return MeanTemporalHead()


def _transformer_head(config: TemporalSettings, width: int) -> nn.Module:
    return TransformerTemporalHead(width=width, layers=config.temporal_layers, heads=temporal_heads_for(config, width),
                                   max_frames=config.max_frames)


register_temporal_head(TemporalHead("mean", _mean_head, paper="CLIP4Clip meanP (Luo et al., Neurocomputing 2022)"))
register_temporal_head(TemporalHead("transformer", _transformer_head, bounded_by_max_frames=True,
                                    paper="CLIP4Clip seqTransf (Luo et al., Neurocomputing 2022)"))
