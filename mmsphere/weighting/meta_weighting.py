"""Meta-learned sample weighting for the training loop: the WeightNet, its optimiser and its meta iteration."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mmsphere.losses import Objective
from mmsphere.plotting import line_plot  # imports matplotlib only when a plot is drawn
from mmsphere.weighting.meta import MetaStepResult, SharedForward, meta_step, meta_step_reusing
from mmsphere.weighting.weight_net import WeightNet


class MetaWeighting:
    """Produces the per-sample weights of the real step and learns them by meta iterations (ARCHITECTURE.md, Meta weighting).

    Takes the training objective and differentiates its contrastive term alone (the meta loss is
    that term, unweighted, on the clean meta batch).
    """

    def __init__(self, config: Any, network: torch.nn.Module, objective: Objective) -> None:
        self.config = config
        self.network = network
        self.weight_net = WeightNet(config.meta.hidden)
        self.optimizer = torch.optim.Adam(self.weight_net.parameters(), lr=config.meta.lr,
                                          weight_decay=config.meta.weight_decay)
        self.objective = objective.contrastive_only()
        self.parameter_names = network.meta_parameter_names(config.meta.params, config.meta.last_blocks)

    def weights(self, per_sample: torch.Tensor) -> torch.Tensor:
        """Weights of the real step: ``V(ℓ.detach(); Θ)`` [n], with no gradient into Θ.

        ``per_sample``: what the WeightNet reads, the objective's ``weight_input`` (the per-sample
        losses, or the contrastive term's own difficulty, e.g. SFace's plain cross-entropy).
        """
        with torch.no_grad():
            weights = self.weight_net(per_sample.detach().float())
        return weights.to(per_sample.dtype)

    def virtual_weights(self, per_sample: torch.Tensor) -> torch.Tensor:
        """Weights of the virtual step, ``V(ℓ.detach(); Θ)`` in ``ℓ``'s dtype, as the meta iteration computes them."""
        with torch.no_grad():
            return self.weight_net(per_sample.detach())

    def group_rates(self, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        """Each virtual parameter's current learning rate, from its own optimiser group."""
        rate_of = {id(parameter): group["lr"] for group in optimizer.param_groups for parameter in group["params"]}
        parameters = dict(self.network.named_parameters())
        return {name: rate_of[id(parameters[name])] for name in self.parameter_names}

    def meta_step(self, train_inputs: dict[str, torch.Tensor], meta_inputs: dict[str, torch.Tensor], *,
                  virtual_lr: float | dict[str, float], train_group_ids: torch.Tensor | None = None,
                  meta_group_ids: torch.Tensor | None = None, step: int | None = None) -> MetaStepResult:
        """One meta iteration (``meta.gradient``), in fp32 outside autocast: the meta-gradient is sensitive to rounding."""
        return meta_step(self.network, self.objective, self.weight_net, self.optimizer, train_inputs, meta_inputs,
                         parameter_names=self.parameter_names, virtual_lr=virtual_lr,
                         gradient=self.config.meta.gradient, normalize=self.config.meta.normalize,
                         train_group_ids=train_group_ids, meta_group_ids=meta_group_ids, step=step)

    def meta_step_reusing(self, shared: SharedForward, train_inputs: dict[str, torch.Tensor],
                          meta_inputs: dict[str, torch.Tensor], *, virtual_lr: float | dict[str, float],
                          train_group_ids: torch.Tensor | None = None, meta_group_ids: torch.Tensor | None = None,
                          step: int | None = None) -> MetaStepResult:
        """One ``jvp`` meta iteration whose virtual step reuses the real step's forward (``shared``)."""
        return meta_step_reusing(self.network, self.objective, self.weight_net, self.optimizer, shared, train_inputs,
                                 meta_inputs, parameter_names=self.parameter_names, virtual_lr=virtual_lr,
                                 normalize=self.config.meta.normalize, train_group_ids=train_group_ids,
                                 meta_group_ids=meta_group_ids, step=step)

    def plot_curve(self, path: Path, max_loss: float) -> None:
        """Save the learned weighting curve ℓ → V(ℓ) as a PNG."""
        device = next(self.weight_net.parameters()).device
        losses = torch.linspace(0.0, max(max_loss, 1e-3) * 1.1, 200, device=device)
        with torch.no_grad():
            weights = self.weight_net(losses).cpu()
        line_plot(losses.cpu().numpy(), weights.numpy(), path, xlabel="per-sample loss ℓ", ylabel="weight V(ℓ)",
                  title="learned weighting curve")
