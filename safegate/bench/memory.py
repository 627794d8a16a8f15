"""Peak memory of a call above what was resident before it: CUDA allocator statistics, or the CPU profiler's records.

Example:
    >>> cpu_peak_bytes(lambda: torch.ones(1000, 1000).sum()) >= 4_000_000
    True
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch

__all__ = ["cpu_peak_bytes", "cuda_peak_bytes", "generate_peak_memory"]


def generate_peak_memory(
    device: str, plain: Any, gated: Any, inputs: dict[str, Any], gen: dict[str, Any]
) -> dict[str, Any]:
    """Peak memory of one generate call (last batch size) above what is resident before it.

    CUDA: `torch.cuda.max_memory_allocated`. CPU: the torch profiler's allocation records, summed in time order
    (allocations net of frees within each op, so a peak inside one op is seen at its end).
    """
    peaks = {}
    for name, fn in (("plain", plain.generate), ("gated", gated.generate)):
        with torch.no_grad():
            call = partial(fn, **inputs, **gen)
            peaks[name] = cuda_peak_bytes(call) if device.startswith("cuda") else cpu_peak_bytes(call)
    method = "torch.cuda.max_memory_allocated" if device.startswith("cuda") else "torch.profiler(profile_memory=True)"
    return {"plain_peak_extra_bytes": peaks["plain"], "gated_peak_extra_bytes": peaks["gated"],
            "ratio": peaks["gated"] / max(peaks["plain"], 1), "method": method}  # fmt: skip


def cuda_peak_bytes(call: Callable[[], Any]) -> int:
    """Peak CUDA memory allocated during `call()` above what was allocated before it."""
    torch.cuda.synchronize()
    resident = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    call()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - resident


def cpu_peak_bytes(call: Callable[[], Any]) -> int:
    """Peak CPU memory torch allocates during `call()` (profiler records: net per op, summed in time order).

    Example:
        >>> cpu_peak_bytes(lambda: torch.ones(1000, 1000).sum()) >= 4_000_000
        True
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call()
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    current = peak = 0
    for event in events:
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak
