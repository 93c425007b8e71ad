"""AdamW parameter groups (per-tower learning rates, no decay where decay hurts) and the LR schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from mmsphere.errors import ConfigError
from mmsphere.train.config import Config


def _no_weight_decay(name: str, parameter: nn.Parameter) -> bool:
    # decay on gains, biases, embeddings or the temperature only pulls them towards zero
    return parameter.ndim < 2 or "embedding" in name or "logit_scale" in name


def build_optimizer(model: nn.Module, config: Config) -> torch.optim.AdamW:
    """AdamW with weight decay off for 1-D parameters, embeddings and the logit scale."""
    tower_lr = {"image": config.model.image_lr, "text": config.model.text_lr}
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        lr = tower_lr.get(model.tower_of(name)) or config.train.lr
        decay = not _no_weight_decay(name, parameter)
        groups.setdefault((lr, decay), []).append(parameter)
    if not groups:
        raise ConfigError("every parameter is frozen: nothing to train (model.freeze_image, model.freeze_text, model.trainable?)")
    param_groups = [
        {"params": params, "lr": lr, "weight_decay": config.train.weight_decay if decay else 0.0}
        for (lr, decay), params in groups.items()
    ]
    return torch.optim.AdamW(param_groups, lr=config.train.lr, betas=config.train.betas, eps=config.train.eps)


def cosine_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from 0, then cosine decay to 0 at ``max_steps`` (open_clip's ``cosine_lr``)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
