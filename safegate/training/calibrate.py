"""Threshold calibration: where the p(unsafe) threshold of a trained gate sits.

Two rules, each setting `gated.gate_config.threshold` (it travels in the bundle, `safegate_config.json`, and is the
default of `generate` / `classify`); prompts are scored on the same cached path as `fit_gate`, which agrees with
`gated.classify`:

- `calibrate_threshold`: flag at most a target share of held-out benign prompts;
- `fit_balanced_threshold`: the threshold that best separates labelled prompts (highest balanced accuracy), e.g.
  the training prompts after joint training, whose LoRA and token-row updates shift every score together (the
  ranking survives, the argmax's placement does not: docs/training.md, "Threshold calibration").

Example:
    >>> threshold_for_fpr([0.1, 0.2, 0.3, 0.9], target_fpr=0.25)  # flags the 0.9 only
    0.3001
    >>> round(balanced_threshold([0.9999, 0.99999, 0.999999], [0, 1, 1]), 6)  # midway in logits: 0.9999 | 0.99999
    0.999968
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from safegate.data.records import label_id, load_records
from safegate.training.gate_fit import cached_scores
from safegate.training.prompt_cache import PromptCache, cache_prompts

__all__ = [
    "Calibration", "balanced_threshold", "calibrate", "calibrate_threshold", "fit_balanced_threshold", "recall_cap",
    "threshold_for_fpr",
]  # fmt: skip

MARGIN = 1e-4
"""How far above the highest benign score that must pass the threshold sits (absorbs float jitter)."""


def threshold_for_fpr(benign_scores: Any, target_fpr: float) -> float:
    """Lowest threshold (unsafe iff p >= threshold) that flags at most `target_fpr` of `benign_scores`.

    It sits a hair (`MARGIN`, or half the gap to the next benign score) above the highest benign score that must
    stay below it, so the calibration set's false-positive rate is <= `target_fpr` exactly.
    """
    if not 0.0 <= target_fpr < 1.0:
        raise ValueError(f"`target_fpr` must be in [0, 1), got {target_fpr!r}.")
    scores = torch.as_tensor(benign_scores, dtype=torch.float64).flatten().sort(descending=True).values
    if not len(scores):
        raise ValueError("threshold calibration needs at least one benign prompt.")
    allowed = int(target_fpr * len(scores) + 1e-9)  # benign prompts that may be flagged
    border = float(scores[allowed])  # the highest score that must stay below the threshold
    above = float(scores[allowed - 1]) if allowed else 1.0
    threshold = min(1.0, border + min(MARGIN, (above - border) / 2) if above > border else border + MARGIN)
    return _tidy(threshold, border, above if above > border else 1.0)


def recall_cap(harmful_scores: Any, min_recall: float) -> float:
    """Highest threshold (unsafe iff p >= threshold) that still flags at least `min_recall` of `harmful_scores`.

    Example:
        >>> recall_cap([0.2, 0.9, 0.95, 0.99], min_recall=0.75)  # keeps 0.9, 0.95 and 0.99 flagged
        0.8999
    """
    if not 0.0 < min_recall <= 1.0:
        raise ValueError(f"`min_recall` must be in (0, 1], got {min_recall!r}.")
    scores = torch.as_tensor(harmful_scores, dtype=torch.float64).flatten().sort(descending=True).values
    if not len(scores):
        raise ValueError("a recall cap needs at least one harmful prompt.")
    keep = max(1, math.ceil(min_recall * len(scores) - 1e-9))  # harmful prompts that must stay flagged
    lowest = float(scores[keep - 1])
    return _tidy(lowest - min(MARGIN, lowest / 2), 0.0, lowest)


def _tidy(threshold: float, above: float, at_most: float) -> float:
    """`threshold` kept in `(above, at_most]`, the interval its guarantee needs, as the gate compares it: in float32
    (`p >= threshold` on float32 scores). Rounded to 6 decimals where that stays inside (a readable bundle config);
    else unrounded; else, for scores one float32 step apart, the next float32 above `above`.

    Example:
        >>> _tidy(0.90010004, 0.9, 0.95), _tidy(0.9999992, 0.9999991, 0.9999993)
        (0.9001, 0.9999992)
    """

    def inside(value: float) -> bool:
        as_compared = float(torch.tensor(value, dtype=torch.float32))
        return float(torch.tensor(above, dtype=torch.float32)) < as_compared <= at_most and value <= at_most

    step = float(torch.nextafter(torch.tensor(above, dtype=torch.float32), torch.tensor(math.inf)))
    return next((v for v in (round(threshold, 6), threshold, step) if inside(v)), threshold)


@dataclass(frozen=True)
class Calibration:
    """What `calibrate_threshold` decided: the threshold set, and why.

    Args:
        threshold (`float`): The threshold now in `gated.gate_config.threshold`.
        fpr_threshold (`float`): The one the false-positive rule alone gave (`capped`: the recall cap was lower and
            set `threshold` instead).
        benign_flagged (`float`): Share of the benign calibration prompts the threshold flags.
        harmful_flagged (`float | None`): Share of the `harmful` prompts it flags (`None` without them).
        n_benign (`int`), n_harmful (`int`): Prompts scored.
    """

    threshold: float
    fpr_threshold: float
    benign_flagged: float
    harmful_flagged: float | None
    n_benign: int
    n_harmful: int

    @property
    def capped(self) -> bool:
        """The recall cap, not the false-positive rule, set the threshold."""
        return self.threshold != self.fpr_threshold


def calibrate_threshold(gated: Any, data: Any, target_fpr: float = 0.05, **kwargs: Any) -> float:
    """The threshold `calibrate(gated, data, target_fpr, **kwargs)` sets (see there); kept for its plain float."""
    return calibrate(gated, data, target_fpr, **kwargs).threshold


def calibrate(
    gated: Any,
    data: Any,
    target_fpr: float = 0.05,
    *,
    harmful: Any = None,
    min_recall: float = 0.9,
    safety_prompt: str | None = None,
    batch_size: int = 8,
) -> Calibration:
    """Set `gated.gate_config.threshold` so at most `target_fpr` of the benign prompts in `data` are flagged.

    With `harmful`, the threshold is capped so that at least `min_recall` of those harmful prompts stay flagged:
    with few benign prompts one outlier sets the threshold (at 3 % of 19 prompts none may be flagged), and a
    benign prompt scoring 1.0 would otherwise put it at 1.0, a gate that flags nothing. A binding cap warns,
    naming both rates.

    Args:
        gated (`SafeGateModel`): The trained gated model (its threshold is set in place; saved with the bundle).
        data: Held-out records or a `PromptCache`; only the benign (`label: safe`) prompts are used. They must
            not be the prompts the gate was fitted on, or the rate will be optimistic.
        target_fpr (`float`): Largest share of benign prompts the threshold may flag.
        harmful: Records (their `label: unsafe` ones, e.g. the training prompts) or a `PromptCache`; `None` = no cap.
        min_recall (`float`): Share of `harmful` the threshold must keep flagged.
        safety_prompt (`str | None`): System message (default: the gate config's `safety_prompt`).
        batch_size (`int`): Prompts per forward while scoring.

    Returns:
        `Calibration`: The threshold now in `gated.gate_config.threshold`, the rule that set it and both rates
        (`calibrate_threshold` returns its `threshold` alone).
    """
    scores = _scores(gated, data, "safe", safety_prompt, batch_size)
    fpr_threshold = threshold = threshold_for_fpr(scores, target_fpr)
    harm = _scores(gated, harmful, "unsafe", safety_prompt, batch_size) if harmful is not None else None
    if harm is not None:
        cap = recall_cap(harm, min_recall)
        if cap < threshold:
            warnings.warn(
                f"calibrate_threshold: flagging at most {target_fpr:.1%} of the {len(scores)} benign prompts needs "
                f"p(unsafe) >= {threshold:.6g}, which flags {float((harm >= threshold).double().mean()):.1%} of the "
                f"{len(harm)} harmful ones; capped at {cap:.6g} (min_recall={min_recall}), which flags "
                f"{float((scores >= cap).double().mean()):.1%} of the benign prompts. More benign calibration "
                "prompts make the rate less sensitive to one outlier.",
                stacklevel=3,
            )
            threshold = cap
    gated.gate_config.threshold = threshold
    return Calibration(
        threshold=threshold,
        fpr_threshold=fpr_threshold,
        benign_flagged=float((scores >= threshold).double().mean()),
        harmful_flagged=None if harm is None else float((harm >= threshold).double().mean()),
        n_benign=len(scores),
        n_harmful=0 if harm is None else len(harm),
    )


def _cache(gated: Any, data: Any, safety_prompt: str | None, batch_size: int, label: str | None = None) -> PromptCache:
    """`data` as a `PromptCache` (as given, or its records' prompts run once, only the `label` ones if given)."""
    if isinstance(data, PromptCache):
        return data
    rows = [r for r in load_records(data, require_response=False) if label is None or r["label"] == label]
    return cache_prompts(gated, rows, batch_size=batch_size, safety_prompt=safety_prompt)


def _scores(gated: Any, data: Any, label: str, safety_prompt: str | None, batch_size: int) -> torch.Tensor:
    """p(unsafe) of the `label` prompts of `data` (records or a `PromptCache`), on the cached path."""
    cache = _cache(gated, data, safety_prompt, batch_size, label)
    return cached_scores(gated, cache)[cache.labels == label_id(label)].double()


def balanced_threshold(scores: Any, labels: Any) -> float:
    """Threshold (unsafe iff p >= threshold) with the highest balanced accuracy on labelled scores (1 = unsafe).

    The cut sits midway, in logit space, between the two neighbouring scores it separates (scores of a saturated
    gate crowd near 0 or 1, where a midpoint in p would land on one of them); of several equally good cuts the
    middle one is taken.
    """
    scores = torch.as_tensor(scores, dtype=torch.float64).flatten()
    labels = torch.as_tensor(labels).flatten().bool()
    if len(scores) != len(labels):
        raise ValueError(f"got {len(scores)} scores but {len(labels)} labels.")
    if not labels.any() or labels.all():
        raise ValueError("a balanced threshold needs both benign (0) and harmful (1) prompts.")
    values = scores.unique()  # sorted; a cut above values[i] flags every score > values[i]
    logits = torch.logit(values.clamp(1e-15, 1 - 1e-15))
    cuts = torch.cat([logits[:1] - 1.0, (logits[1:] + logits[:-1]) / 2])  # below each distinct score
    flagged = scores[None, :] >= torch.sigmoid(cuts)[:, None]
    accuracy = flagged[:, labels].double().mean(1) + (~flagged[:, ~labels]).double().mean(1)
    best = (accuracy >= accuracy.max() - 1e-12).nonzero().flatten()
    return float(torch.sigmoid(cuts[best[len(best) // 2]]))


def fit_balanced_threshold(gated: Any, data: Any, *, safety_prompt: str | None = None, batch_size: int = 8) -> float:
    """Set `gated.gate_config.threshold` to `balanced_threshold` of the gate's scores on labelled `data`.

    Args:
        gated (`SafeGateModel`): The trained gated model (its threshold is set in place; saved with the bundle).
        data: Labelled records or a `PromptCache`, both classes present (`gate: false` records are left out).
        safety_prompt (`str | None`): System message (default: the gate config's `safety_prompt`).
        batch_size (`int`): Prompts per forward while scoring.

    Returns:
        `float`: The threshold now in `gated.gate_config.threshold`.
    """
    cache = _cache(gated, data, safety_prompt, batch_size)
    threshold = balanced_threshold(cached_scores(gated, cache), cache.labels)
    gated.gate_config.threshold = threshold
    return threshold
