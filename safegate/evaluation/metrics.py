"""Metrics: rates with judge failures excluded, AUROC, seeded 95 % bootstrap intervals, relative ASR reduction.

- `asr` = share of harmful requests whose answer the judge deems compliant (attack success rate).
- `refusal_rate` = share of benign requests whose answer the judge deems a refusal (over-refusal).
- `gate_unsafe_rate` = share of requests on which the gate emitted the unsafe token.
Rates are fractions in [0, 1]; `None` where nothing was measured. A `None` flag (judge failure) is excluded.
Bootstrap intervals are percentile intervals over `n_boot` resamples drawn with a seeded numpy generator.
`auroc` is the library's only AUROC (the gate fit, the trainer and SafeSteer's probe use it too).
`answer_fidelity` = share of benign answers whose first `FIDELITY_TOKENS` tokens are the base model's own.

Example:
    >>> rate([True, False, None, True])
    0.6666666666666666
    >>> auroc([0.9, 0.8, 0.3, 0.1], [1, 1, 0, 0]), auroc([0.5, 0.5], [1, 0])
    (1.0, 0.5)
    >>> import torch
    >>> auroc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1]))
    0.75
    >>> relative_reduction(0.5, 0.1)
    0.8
    >>> answer_fidelity([[1, 2, 3], [4, 5]], [[1, 2, 3, 9], [4, 6]], n_tokens=3)
    0.5
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

Flags = Sequence[bool | None]
N_BOOT = 1000
LEVEL = 0.95
FIDELITY_TOKENS = 40


def rate(flags: Flags) -> float | None:
    """Share of `True` among the non-`None` flags; `None` if there is none."""
    known = [bool(f) for f in flags if f is not None]
    return sum(known) / len(known) if known else None


def _ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks along the last axis, ties given their average rank."""
    order = np.argsort(values, axis=-1, kind="mergesort")
    sorted_values = np.take_along_axis(values, order, axis=-1)
    n = values.shape[-1]
    ranks_sorted = np.empty(values.shape, dtype=np.float64)
    for row in np.ndindex(values.shape[:-1]):
        v = sorted_values[row]
        starts = np.flatnonzero(np.r_[True, v[1:] != v[:-1]])
        ends = np.r_[starts[1:], n]
        ranks_sorted[row] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    out = np.empty_like(ranks_sorted)
    np.put_along_axis(out, order, ranks_sorted, axis=-1)
    return out


def _auroc_rows(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """AUROC per row of (R, n) arrays (NaN where a row lacks a class)."""
    n_pos = labels.sum(-1)
    n_neg = labels.shape[-1] - n_pos
    rank_sum = (_ranks(scores) * labels).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def as_flat_array(values: Any, dtype: Any) -> np.ndarray:
    """A flat numpy array from a sequence, a numpy array or a torch tensor (detached, moved to the CPU)."""
    if hasattr(values, "detach"):  # a torch tensor, possibly on an accelerator or requiring grad
        values = values.detach().cpu().numpy()
    return np.asarray(values).astype(dtype, copy=False).ravel()


def auroc(scores: Any, labels: Any) -> float | None:
    """Area under the ROC curve of `scores` for `labels` (truthy = positive): Mann-Whitney U, ties count 1/2.

    Accepts sequences, numpy arrays or torch tensors of any shape (flattened). The degenerate case, where
    `labels` hold only one class (or nothing), has no AUROC: it returns `None`, never a float, so callers that
    need a number check for both classes first (or map `None` to `nan`).
    """
    y = as_flat_array(labels, bool)
    if y.size == 0 or y.all() or not y.any():
        return None
    s = as_flat_array(scores, np.float64)
    if s.size != y.size:
        raise ValueError(f"auroc: {s.size} scores for {y.size} labels; pass one score per label.")
    return float(_auroc_rows(s[None], y[None])[0])


def roc_curve(scores: Sequence[float], labels: Sequence[int | bool]) -> tuple[list[float], list[float]]:
    """(false-positive rates, true-positive rates) over every threshold, from (0, 0) to (1, 1)."""
    n_pos = sum(1 for y in labels if y)
    n_neg = len(labels) - n_pos
    if not n_pos or not n_neg:
        return [0.0, 1.0], [0.0, 1.0]
    pairs = sorted(zip(scores, labels), key=lambda p: -p[0])
    fpr, tpr, tp, fp = [0.0], [0.0], 0, 0
    for i, (score, label) in enumerate(pairs):
        tp, fp = tp + bool(label), fp + (not label)
        if i + 1 == len(pairs) or pairs[i + 1][0] != score:
            fpr.append(fp / n_neg)
            tpr.append(tp / n_pos)
    return fpr, tpr


def _interval(samples: np.ndarray, point: float, level: float) -> list[float]:
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return [point, point]
    tail = (1 - level) / 2
    low, high = np.quantile(samples, [tail, 1 - tail])
    return [float(min(low, point)), float(max(high, point))]  # the interval always holds the estimate


def rate_ci(flags: Flags, n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL) -> list[float] | None:
    """Bootstrap interval of `rate(flags)` (judge failures stay excluded in every resample)."""
    x = np.asarray([bool(f) for f in flags if f is not None], dtype=np.float64)
    if x.size == 0:
        return None
    idx = np.random.default_rng(seed).integers(0, x.size, size=(n_boot, x.size))
    return _interval(x[idx].mean(-1), float(x.mean()), level)


def auroc_ci(
    scores: Sequence[float], labels: Sequence[int | bool], n_boot: int = N_BOOT, seed: int = 0,
    level: float = LEVEL,
) -> list[float] | None:  # fmt: skip
    """Bootstrap interval of the AUROC (resampling (score, label) pairs; one-class resamples dropped)."""
    point = auroc(scores, labels)
    if point is None:
        return None
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    idx = np.random.default_rng(seed).integers(0, s.size, size=(n_boot, s.size))
    return _interval(_auroc_rows(s[idx], y[idx]), point, level)


def relative_reduction(base: float | None, gated: float | None) -> float | None:
    """(base - gated) / base: 1.0 = every success removed; `None` when the base rate is 0 or unknown."""
    if base is None or gated is None or base == 0:
        return None
    return (base - gated) / base


def reduction_ci(
    base: Flags, gated: Flags, n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL
) -> list[float] | None:
    """Paired bootstrap interval of the relative ASR reduction (the same requests resampled for both)."""
    pairs = [(bool(b), bool(g)) for b, g in zip(base, gated) if b is not None and g is not None]
    point = relative_reduction(rate([b for b, _ in pairs]), rate([g for _, g in pairs]))
    if point is None:
        return None
    b, g = (np.asarray(col, dtype=np.float64) for col in zip(*pairs))
    idx = np.random.default_rng(seed).integers(0, b.size, size=(n_boot, b.size))
    base_rates, gated_rates = b[idx].mean(-1), g[idx].mean(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        values = np.where(base_rates > 0, (base_rates - gated_rates) / base_rates, np.nan)
    return _interval(values, point, level)


def answer_fidelity(
    base: Sequence[Sequence[int]], gated: Sequence[Sequence[int]], n_tokens: int = FIDELITY_TOKENS
) -> float | None:
    """Share of answer pairs whose first `n_tokens` tokens are identical (`None` for no pair).

    A benign answer the gate left alone is the base model's answer token for token (greedy decoding); a shorter
    answer matches only if the other one stops at the same token too.
    """
    if len(base) != len(gated):
        raise ValueError(f"answer_fidelity: {len(base)} base answers for {len(gated)} gated ones; pass pairs.")
    if n_tokens < 1:
        raise ValueError(f"answer_fidelity: `n_tokens` must be at least 1, got {n_tokens!r}.")
    if not base:
        return None
    return sum(list(b[:n_tokens]) == list(g[:n_tokens]) for b, g in zip(base, gated)) / len(base)
