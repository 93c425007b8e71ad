"""The weighting network of Meta-Weight-Net (Shu et al., NeurIPS 2019)."""

from __future__ import annotations

import torch
from torch import nn


class WeightNet(nn.Module):
    """``V(ℓ; Θ) = sigmoid(W₂·ReLU(W₁ℓ + b₁) + b₂)``: one per-sample loss in, one weight in (0, 1) out."""

    def __init__(self, hidden: int = 100) -> None:
        super().__init__()
        if hidden < 1:
            raise ValueError(f"WeightNet hidden={hidden} must be >= 1")
        self.hidden = nn.Linear(1, hidden)
        self.output = nn.Linear(hidden, 1)

    def forward(self, losses: torch.Tensor) -> torch.Tensor:
        """losses: [n] per-sample losses -> [n] weights in (0, 1)."""
        if losses.dim() != 1:
            raise ValueError(f"WeightNet expects per-sample losses of shape [n], got {tuple(losses.shape)}")
        hidden = torch.relu(self.hidden(losses.to(self.hidden.weight.dtype).unsqueeze(-1)))
        return torch.sigmoid(self.output(hidden)).squeeze(-1)
