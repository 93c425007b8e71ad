"""Collectives for the objective under several processes, with gradients where the math needs them.

Convention (the one data-parallel training relies on): every rank calls ``backward`` on its own
loss, and the gradient that reaches a rank's tensor is the SUM over ranks of each rank's loss
differentiated by that tensor. DDP then averages parameter gradients over ranks, so a loss that
every rank computes in full (global mode) or that averages to the full loss over ranks (local mode)
yields exactly the single-process gradients. ``accelerator.gather`` / ``dist.all_gather`` carry no
gradient, hence the autograd functions here. Their backward passes are themselves differentiable,
so second-order gradients (the meta-weighting virtual step) flow through them too, and each has a
forward-mode rule (tangents are gathered or reduced like the values), which the exact meta-gradient
of ``meta.gradient: jvp`` needs.

Invariant: every rank calls every collective here in the same order in every step. Whether a rank
calls one may never depend on rank-local data (the modality of its batch, which parameters got a
gradient, whether its batch had a bad sample); a rank that skips a collective leaves the others
waiting in it for ever.

All collectives use the default process group; outside ``torch.distributed`` they are identities.
Ranks may hold different numbers of rows (gloo cannot gather uneven tensors, so rows are padded).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "WorldInfo",
    "world_info",
    "gather_sizes",
    "all_gather_with_grad",
    "all_gather_local_grad",
    "all_gather_no_grad",
    "all_reduce_with_grad",
    "all_reduce_values",
    "scale_gradient",
    "shared_seed",
]


class WorldInfo(NamedTuple):
    """This process's rank and the number of processes (``(0, 1)`` outside torch.distributed)."""

    rank: int
    world_size: int


def world_info() -> WorldInfo:
    """Rank and world size of the default process group, or ``(0, 1)`` when there is none."""
    if dist.is_available() and dist.is_initialized():
        return WorldInfo(dist.get_rank(), dist.get_world_size())
    return WorldInfo(0, 1)


def gather_sizes(rows: int, device: torch.device | str = "cpu") -> list[int]:
    """The number of rows each rank holds, in rank order (one small all-gather)."""
    rank, world_size = world_info()
    if world_size == 1:
        return [rows]
    mine = torch.tensor([rows], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(mine) for _ in range(world_size)]
    dist.all_gather(sizes, mine)
    return [int(size.item()) for size in sizes]


def all_gather_with_grad(tensor: Tensor, sizes: list[int] | None = None) -> Tensor:
    """Concatenate every rank's ``tensor`` along dim 0; gradients flow back to each rank's rows.

    tensor: [n_rank, ...]; sizes: every rank's n (from :func:`gather_sizes`; all equal if None).
    Backward: all-reduce-sum of the incoming gradient, then this rank's slice.
    """
    if world_info().world_size == 1:
        return tensor
    return _AllGather.apply(tensor, _sizes_or_equal(tensor, sizes))


def all_gather_local_grad(tensor: Tensor, sizes: list[int] | None = None) -> Tensor:
    """Concatenate every rank's rows; only this rank's rows keep their graph (no backward traffic).

    Forward mode gathers the tangents of every rank's rows (each rank's rows do depend on the
    parameters, whose tangent is the same on every rank).
    """
    if world_info().world_size == 1:
        return tensor
    return _AllGatherLocalGrad.apply(tensor, _sizes_or_equal(tensor, sizes))


def all_gather_no_grad(tensor: Tensor, sizes: list[int] | None = None) -> Tensor:
    """Concatenate every rank's rows, detached (sample weights, sizes, logged values)."""
    if world_info().world_size == 1:
        return tensor.detach()
    return torch.cat(_gather(tensor.detach(), _sizes_or_equal(tensor, sizes)), dim=0)


def all_reduce_with_grad(tensor: Tensor) -> Tensor:
    """Sum of ``tensor`` over ranks; backward all-reduce-sums the gradient (the sum is replicated)."""
    if world_info().world_size == 1:
        return tensor
    return _AllReduceSum.apply(tensor)


def all_reduce_values(tensor: Tensor, average: bool = False) -> Tensor:
    """Sum (or mean) over ranks of a detached tensor, for logging and normalisers."""
    result = tensor.detach().clone()
    world_size = world_info().world_size
    if world_size > 1:
        dist.all_reduce(result, op=dist.ReduceOp.SUM)
        if average:
            result = result / world_size
    return result


def scale_gradient(tensor: Tensor, factor: float) -> Tensor:
    """Identity forward; multiplies the gradient by ``factor`` on the way back."""
    if factor == 1:
        return tensor
    return _ScaleGradient.apply(tensor, factor)


def shared_seed(seed: int | None, device: torch.device | str = "cpu") -> int | None:
    """``seed`` itself, or when None under several processes a fresh seed drawn on rank 0 for all."""
    rank, world_size = world_info()
    if seed is not None or world_size == 1:
        return seed
    drawn = int(np.random.SeedSequence().generate_state(1, dtype=np.uint32)[0]) if rank == 0 else 0
    value = torch.tensor([drawn], dtype=torch.long, device=device)
    dist.broadcast(value, src=0)
    return int(value.item())


# --------------------------------------------------------------------------------------------


def _sizes_or_equal(tensor: Tensor, sizes: list[int] | None) -> list[int]:
    world_size = world_info().world_size
    if sizes is None:
        return [tensor.shape[0]] * world_size
    if len(sizes) != world_size:
        raise ValueError(f"sizes={sizes} must hold one entry per rank (world size {world_size})")
    return list(sizes)


def _gather(tensor: Tensor, sizes: list[int]) -> list[Tensor]:
    """Every rank's rows, padded to the largest size for the collective and trimmed after."""
    largest = max(sizes)
    tensor = tensor.contiguous()
    if tensor.shape[0] < largest:
        padding = tensor.new_zeros((largest - tensor.shape[0], *tensor.shape[1:]))
        tensor = torch.cat([tensor, padding], dim=0)
    buffers = [torch.empty_like(tensor) for _ in sizes]
    dist.all_gather(buffers, tensor)
    return [buffer[:size] for buffer, size in zip(buffers, sizes)]


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: Tensor, sizes: list[int]) -> Tensor:  # type: ignore[override]
        rank = dist.get_rank()
        ctx.sizes = sizes
        ctx.start = sum(sizes[:rank])
        ctx.stop = ctx.start + sizes[rank]
        return torch.cat(_gather(tensor, sizes), dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return all_reduce_with_grad(grad.contiguous())[ctx.start:ctx.stop], None

    @staticmethod
    def jvp(ctx, tangent: Tensor, _sizes: None) -> Tensor:  # type: ignore[override]
        return torch.cat(_gather(tangent, ctx.sizes), dim=0)


class _AllGatherLocalGrad(_AllGather):
    """The same gather and tangents; backward keeps this rank's rows only, with no traffic."""

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad[ctx.start:ctx.stop], None


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:  # type: ignore[override]
        result = tensor.contiguous().clone()
        dist.all_reduce(result, op=dist.ReduceOp.SUM)
        return result

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        return _AllReduceSum.apply(grad.contiguous())

    @staticmethod
    def jvp(ctx, tangent: Tensor) -> Tensor:  # type: ignore[override]
        result = tangent.contiguous().clone()
        dist.all_reduce(result, op=dist.ReduceOp.SUM)
        return result


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: Tensor, factor: float) -> Tensor:  # type: ignore[override]
        ctx.factor = factor
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad * ctx.factor, None

    @staticmethod
    def jvp(ctx, tangent: Tensor, _factor: None) -> Tensor:  # type: ignore[override]
        return tangent.view_as(tangent)
