"""Temporal heads: pool per-frame features ``[B, T, D]`` into one video feature ``[B, D]``.

Both heads follow CLIP4Clip (Luo et al., 2022): ``mean`` is its parameter-free meanP, ``transformer``
its seqTransf (frame position embeddings + a small transformer + a residual to the frame features,
then the masked mean). The caller L2-normalises the frame features before and the result after.
"""

from __future__ import annotations

import torch
from torch import nn

from mmsphere.config import ConfigError, ModelConfig

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


def temporal_heads_for(config: ModelConfig, width: int) -> int:
    """Attention heads of the transformer head: ``model.temporal_heads``, or ``width // 64`` (at least 1)."""
    if config.temporal_heads < 0:
        raise ConfigError(f"model.temporal_heads={config.temporal_heads} must be >= 0 (0 = width // 64)")
    heads = config.temporal_heads or max(1, width // HEAD_WIDTH)
    if width % heads != 0:
        raise ConfigError(
            f"model.temporal_heads={heads} must divide the embedding width {width} of the temporal head"
        )
    return heads


def build_temporal_head(config: ModelConfig, width: int) -> nn.Module:
    """The temporal head named by ``model.temporal_head`` over features of size ``width``."""
    if config.temporal_head == "mean":
        return MeanTemporalHead()
    if config.temporal_head == "transformer":
        return TransformerTemporalHead(
            width=width,
            layers=config.temporal_layers,
            heads=temporal_heads_for(config, width),
            max_frames=config.max_frames,
        )
    raise ConfigError(f"model.temporal_head={config.temporal_head!r} must be 'mean' or 'transformer'")
