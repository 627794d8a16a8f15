"""Paired, interleaved timings: A B, B A, A B, ... after one warm-up each; the median ratio b/a and its IQR.

Interleaving cancels slow drifts of the machine (thermal, other processes) that would bias back-to-back runs; the
interquartile range of the per-pair ratios is the noise the median sits in (docs/performance.md, "Method").

Example:
    >>> values = iter([1.0, 2.0] * 4)
    >>> paired_values(lambda: next(values), lambda: next(values), pairs=3)["ratio"]
    2.0
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["FirstTokenClock", "paired_generate", "paired_timing", "paired_values", "ratio_summary", "sync"]


def sync(device: str) -> None:
    """Wait for the device's queued work (CUDA), so a wall clock measures it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def paired_timing(a: Callable[[], Any], b: Callable[[], Any], pairs: int, device: str) -> dict[str, float]:
    """Median of b/a wall-time ratios over interleaved pairs (A B, B A, ...), after one warm-up each."""

    def timed(fn: Callable[[], Any]) -> Callable[[], float]:
        def run() -> float:
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            return time.perf_counter() - start

        return run

    return paired_values(timed(a), timed(b), pairs)


def paired_values(a: Callable[[], float], b: Callable[[], float], pairs: int) -> dict[str, float]:
    """Median of b()/a() over interleaved pairs (A B, B A, ...) of measured values, after one warm-up each."""
    a(), b()
    va, vb = [], []
    for i in range(pairs):
        if i % 2 == 0:
            va.append(a())
            vb.append(b())
        else:
            vb.append(b())
            va.append(a())
    return ratio_summary([y / x for x, y in zip(va, vb, strict=True)], va, vb)


def ratio_summary(ratios: list[float], plain: list[float], gated: list[float]) -> dict[str, Any]:
    """Median ratio with its interquartile range (the noise of the machine), median times, every pair's ratio."""
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return {"ratio": statistics.median(ratios), "ratio_iqr": [quartiles[0], quartiles[2]],
            "plain_s": statistics.median(plain), "gated_s": statistics.median(gated), "ratios": ratios}  # fmt: skip


class FirstTokenClock:
    """`generate` streamer that records when the first generated (answer) token arrives."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first: float | None = None
        self.puts = 0

    def put(self, value: torch.Tensor) -> None:
        self.puts += 1
        if self.puts == 2 and self.first is None:
            self.first = time.perf_counter() - self.start

    def end(self) -> None:
        pass


def paired_generate(
    a: Callable[..., Any],
    b: Callable[..., Any],
    inputs: dict[str, Any],
    gen: dict[str, Any],
    pairs: tuple[int, int],
    device: str,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Paired wall times of two `generate` callables: the whole answer, and the time to its first token
    (`pairs`: how many pairs for each)."""

    def ttft(fn: Callable[..., Any]) -> float:
        clock = FirstTokenClock()
        sync(device)
        clock.start = time.perf_counter()
        fn(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False, streamer=clock)
        return clock.first or float("nan")

    with torch.no_grad():
        whole = paired_timing(lambda: a(**inputs, **gen), lambda: b(**inputs, **gen), pairs[0], device)
        first = paired_values(lambda: ttft(a), lambda: ttft(b), pairs[1])
    return whole, first
