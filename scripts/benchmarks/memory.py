"""Peak memory of a benchmark variant, measured in the fresh process that runs it."""

from __future__ import annotations

from collections.abc import Callable

import torch


def status_mb(field: str) -> float:
    """A ``/proc/self/status`` field (VmRSS, VmHWM) in MB."""
    with open("/proc/self/status") as handle:
        line = next(line for line in handle if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def peak_mb(build: Callable[[], Callable[[int], None]], steps: int, device: str) -> float:
    """Peak memory (MB) of ``build()`` and ``steps`` calls of the step it returns.

    CPU: growth of the peak resident set (VmHWM, reset through /proc/self/clear_refs) over the
    resident set before building, so torch's own import footprint is not counted; CUDA: max allocated.
    """
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # resets VmHWM to the current resident set
    before = status_mb("VmRSS")
    step = build()
    for index in range(steps):
        step(index)
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return status_mb("VmHWM") - before
