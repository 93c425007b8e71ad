"""One optimisation step: the meta iteration, features → objective terms → per-sample weights → reduced loss → update.

:func:`optimization_step` is the step the training loop, the distributed tests and the benchmarks
all run on a :class:`~mmsphere.train.task.Task`: an optional meta iteration of the WeightNet, the
forward and backward of the global batch (with accumulation against the whole batch's features), a
collective check that the loss is finite everywhere (a non-finite step is skipped and its BatchNorm
statistics restored), gradient clipping, the optimiser and scheduler steps, and the clamps of the
logit scale and bias.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmsphere.data.batch import Batch
from mmsphere.losses import ObjectiveOutput
from mmsphere.train.task import Task, finite_everywhere
from mmsphere.weighting import MetaStepResult


@dataclass
class StepResult:
    """What one optimisation step did: the objective's output, the meta iteration's, and whether it was skipped."""

    output: ObjectiveOutput
    meta: MetaStepResult | None
    skipped: bool  # non-finite loss somewhere: no update, BatchNorm statistics restored


def optimization_step(task: Task, batch: Batch, optimizer: torch.optim.Optimizer, meta_batch: Batch | None = None,
                      *, step: int = 0) -> StepResult:
    """Training step ``step`` on this process's share of the global batch (``step`` fixes the draws and schedules).

    With a meta weighting and ``meta_batch``, a meta iteration of the WeightNet runs first.
    """
    batch = batch.to(task.device)
    statistics = running_statistics(task.network)
    saved = {name: buffer.clone() for name, buffer in statistics.items()}
    if meta_batch is not None and task.reuses_train_forward():
        meta, output = task.meta_and_forward_backward(batch, meta_batch.to(task.device), optimizer, step=step)
    else:
        meta = task.meta_step(batch, meta_batch.to(task.device), optimizer, step=step) if meta_batch is not None else None
        output = task.forward_backward(batch, step=step)
    if not finite_everywhere(output.loss):
        optimizer.zero_grad(set_to_none=True)
        # the skipped forward already folded its (non-finite) batch statistics into BatchNorm
        with torch.no_grad():
            for name, buffer in statistics.items():
                buffer.copy_(saved[name])
        return StepResult(output, meta, skipped=True)
    task.clip_gradients()
    optimizer.step()
    if task.scheduler is not None:
        task.scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    task.clamp_logit_scale()
    return StepResult(output, meta, skipped=False)


def running_statistics(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The BatchNorm buffers a forward in train mode updates (running mean/var, batches tracked)."""
    return {f"{module_name}.{name}" if module_name else name: buffer
            for module_name, module in network.named_modules()
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm)
            for name, buffer in module.named_buffers(recurse=False) if buffer is not None}
