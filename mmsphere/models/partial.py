"""A tower split at one block of its block stack: the input of that block, and the tower from there on.

With the blocks before block ``start`` frozen, what enters block ``start`` is a pure function of the
sample, so it can be computed once and cached; training then runs only the blocks from ``start`` on
and what follows them (final norm, pooling, projection). Both halves reuse the tower's own forward,
so no architecture is re-implemented here:

- :func:`block_input` runs the tower until block ``start`` is called and returns that block's input;
- :func:`from_block` runs the tower with its stack cut to ``stack[start:]`` and the first remaining
  block's input replaced by the cached one. The modules before the stack (patch or token embedding, a
  CNN stem) still run, on whatever input the caller gives: a batch of one dummy image for an image
  tower (their output is replaced, so only its existence matters), the real token ids for a text tower
  (its pooling after the stack reads them, e.g. the end-of-text position).

The stack is the tower's largest stack of identical blocks (``DualEncoder._block_stacks``). A block's
input is ``[B, ...]``, batch first, as every supported stack runs (open_clip's transformers, which are
batch-first, its ResNet stages, transformers' BERT layers, timm's EfficientNet stages); a stack that
ran sequence-first would need a transpose here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn


class _Reached(Exception):
    """Raised by the hook at the split block: the rest of the tower is not needed."""


def block_input(run_tower: Callable[[], Any], stack: nn.Module, start: int) -> torch.Tensor:
    """The input of ``stack[start]`` while ``run_tower()`` runs, ``[B, ...]``; the tower stops there."""
    if not 0 <= start < len(stack):
        raise ValueError(f"start={start} must index the stack of {len(stack)} blocks")
    captured: list[torch.Tensor] = []

    def capture(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append(args[0] if args else next(iter(kwargs.values())))
        raise _Reached

    handle = stack[start].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        run_tower()
    except _Reached:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"the tower never called block {start} of its stack")
    return captured[0]


@contextlib.contextmanager
def from_block(owner: nn.Module, attribute: str, start: int, cached: torch.Tensor) -> Iterator[None]:
    """Within the block, the tower's stack ``owner.<attribute>`` is ``stack[start:]`` and its first block sees ``cached``.

    ``cached``: ``[B, ...]`` block inputs (as :func:`block_input` returned them).
    """
    stack = getattr(owner, attribute)
    if not 0 <= start < len(stack):
        raise ValueError(f"start={start} must index the stack of {len(stack)} blocks")
    first = stack[start]
    entering = cached

    def substitute(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (entering, *args[1:]), kwargs
        name = next(iter(kwargs))  # a stack that passes its hidden states by keyword
        return args, {**kwargs, name: entering}

    # the same block objects in a shorter container: parameters, hooks and state are shared
    tail = list(stack)[start:]
    setattr(owner, attribute, nn.Sequential(*tail) if isinstance(stack, nn.Sequential) else nn.ModuleList(tail))
    handle = first.register_forward_pre_hook(substitute, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
        setattr(owner, attribute, stack)


def modules_from(run_tower: Callable[[], Any], root: nn.Module, stack: nn.Module, start: int) -> list[nn.Module]:
    """The modules under ``root`` that ``run_tower()`` first calls once ``stack[start]`` has been called.

    With :func:`from_block`, these and ``stack[start:]`` are what runs on a cached block input (the
    final norm, pooling, a CNN's head convolution, the projection); every other module under ``root``
    is computed once into the cache and must not train.
    """
    order: list[nn.Module] = []
    seen: set[int] = set()

    def record(module: nn.Module, args: tuple) -> None:
        if id(module) not in seen:
            seen.add(id(module))
            order.append(module)

    handles = [module.register_forward_pre_hook(record) for module in root.modules()]
    try:
        with torch.no_grad():
            run_tower()
    finally:
        for handle in handles:
            handle.remove()
    if id(stack[start]) not in seen:
        raise RuntimeError(f"the tower never called block {start} of its stack")
    return order[order.index(stack[start]):]
