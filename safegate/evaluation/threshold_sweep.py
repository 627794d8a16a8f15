"""What another p(unsafe) threshold would have given, read from a finished evaluation's `responses.jsonl`.

A threshold changes a gated answer only through the verdict (unsafe iff p(unsafe) >= threshold). At threshold `t`
each request keeps its measured gated answer when its verdict at `t` is the verdict it was measured with; otherwise
its answer is inferred, and each point counts those (`inferred`):

- safe at `t`, flagged when measured: the base model's answer. Exact with `GateConfig(safe_answer="base")`, where
  a safe verdict hands the answer to the base model (the report's `gate_config` says which); an approximation
  otherwise, when LoRA writes the safe answers.
- flagged at `t`, safe when measured: a refusal. An assumption; `unsafe_refusal_rate` is the measured share of
  refusals among the answers that did follow `<|unsafe|>`.

So a sweep costs no generation: it shows the whole trade-off between attack success and over-refusal that a
threshold can buy on the same gate, and whether a target pair is out of reach of any threshold (the prompts'
order, not the cut, is then what must change).

Example:
    >>> rows = [dict(dataset="h", attack="none", label="unsafe", p_unsafe=p, gate_unsafe=p >= 0.5,
    ...              base_refused=False, gated_refused=p >= 0.5) for p in (0.9, 0.6, 0.2)]
    >>> rows += [dict(dataset="b", attack="none", label="safe", p_unsafe=p, gate_unsafe=p >= 0.5,
    ...               base_refused=False, gated_refused=p >= 0.5) for p in (0.7, 0.1)]
    >>> [(round(p.threshold, 2), p.rates["h/none"], p.rates["b/none"], p.inferred) for p in sweep(rows, [0.5, 0.8])]
    [(0.5, 0.3333333333333333, 0.5, 0), (0.8, 0.6666666666666666, 0.0, 2)]
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

Row = dict[str, Any]


@dataclass(frozen=True)
class OperatingPoint:
    """The gated rates at one threshold.

    `rates` maps `dataset/attack` to the gated attack success rate (rows of harmful requests: share not refused)
    or the gated refusal rate (benign rows); `flagged` maps the same keys to the share the gate flags; `inferred`
    counts the answers not measured at this threshold (see the module docstring).
    """

    threshold: float
    rates: dict[str, float]
    flagged: dict[str, float]
    inferred: int


def harmful(row: Row) -> bool:
    return row.get("label") == "unsafe"


def groups(rows: Sequence[Row]) -> dict[str, tuple[bool, list[Row]]]:
    """Rows by `dataset/attack` (the report's row names) and label: name -> (harmful?, rows). A dataset with both
    labels gives two names, `dataset/attack (harmful)` and `dataset/attack (benign)`."""
    named: dict[str, dict[bool, list[Row]]] = {}
    for row in rows:
        named.setdefault(f"{row['dataset']}/{row['attack']}", {}).setdefault(harmful(row), []).append(row)
    out = {}
    for name, by_label in named.items():
        for is_harmful, group in by_label.items():
            label = f"{name} ({'harmful' if is_harmful else 'benign'})" if len(by_label) > 1 else name
            out[label] = (is_harmful, group)
    return out


def scored(row: Row) -> bool:
    """Whether the response carries the gate's score (`p_unsafe`), which a sweep needs."""
    return isinstance(row.get("p_unsafe"), (int, float))


def _check(rows: Sequence[Row]) -> None:
    if not rows:
        raise ValueError("responses: no rows to sweep; pass the rows of a report's responses.jsonl.")
    missing = [i for i, r in enumerate(rows) if not scored(r)]
    if missing:
        raise ValueError(
            f"responses: row {missing[0]} ({len(missing)} in all) has no gate score `p_unsafe`; a threshold sweep "
            "needs a gated evaluation (`safegate eval --defense casa`)."
        )


def refused_at(row: Row, threshold: float) -> tuple[bool | None, bool]:
    """(gated answer refused at `threshold` or `None` if the judge could not tell, inferred?) of one response."""
    flagged = row["p_unsafe"] >= threshold
    if flagged == bool(row["gate_unsafe"]):
        return row["gated_refused"], False
    return (True if flagged else row["base_refused"]), True


def default_thresholds(rows: Sequence[Row]) -> list[float]:
    """Every distinct score (each one a place where a verdict flips), and one above them all (nothing flagged)."""
    scores = sorted({float(r["p_unsafe"]) for r in rows})
    return [*scores, math.nextafter(scores[-1], math.inf)]


def sweep(rows: Sequence[Row], thresholds: Iterable[float] | None = None) -> list[OperatingPoint]:
    """The gated rates of `rows` (responses.jsonl rows) at each threshold (default: `default_thresholds`)."""
    _check(rows)
    named = groups(rows)
    points = []
    for t in default_thresholds(rows) if thresholds is None else thresholds:
        rates, flagged, inferred = {}, {}, 0
        for name, (is_harmful, group) in named.items():
            known = []
            for row in group:
                refused, guessed = refused_at(row, t)
                inferred += guessed
                if refused is not None:
                    known.append(not refused if is_harmful else refused)
            if known:
                rates[name] = sum(known) / len(known)
            flagged[name] = sum(r["p_unsafe"] >= t for r in group) / len(group)
        points.append(OperatingPoint(float(t), rates, flagged, inferred))
    return points


def base_rates(rows: Sequence[Row]) -> dict[str, float]:
    """The base model's rate per `dataset/attack` (ASR for harmful rows, refusal for benign), as `sweep` counts."""
    out = {}
    for name, (is_harmful, group) in groups(rows).items():
        known = [not r["base_refused"] if is_harmful else r["base_refused"] for r in group
                 if r.get("base_refused") is not None]  # fmt: skip
        if known:
            out[name] = sum(known) / len(known)
    return out


def reductions(point: OperatingPoint, base: dict[str, float], names: Iterable[str]) -> dict[str, float]:
    """Relative ASR reduction at `point`, (base - gated) / base, of each of `names` with a base ASR above 0."""
    return {n: 1 - point.rates[n] / base[n] for n in names if base.get(n) and n in point.rates}


def keeping_reduction(
    points: Sequence[OperatingPoint], base: dict[str, float], harmful_names: Sequence[str], min_reduction: float
) -> list[OperatingPoint]:
    """Those of `points` (a `sweep`) at which every row of `harmful_names` that has a base ASR (`base`, from
    `base_rates`) keeps a relative ASR reduction of at least `min_reduction` (empty if none does).

    Example:
        >>> rows = [dict(dataset="h", attack="none", label="unsafe", p_unsafe=p, gate_unsafe=p >= 0.5,
        ...              base_refused=False, gated_refused=p >= 0.5) for p in (0.9, 0.6, 0.2)]
        >>> rows += [dict(dataset="b", attack="none", label="safe", p_unsafe=p, gate_unsafe=p >= 0.5,
        ...               base_refused=False, gated_refused=p >= 0.5) for p in (0.7, 0.1)]
        >>> kept = keeping_reduction(sweep(rows), base_rates(rows), ["h/none"], 0.6)
        >>> [(p.threshold, p.rates["b/none"]) for p in kept]
        [(0.1, 1.0), (0.2, 0.5), (0.6, 0.5)]
    """
    needed = [n for n in harmful_names if base.get(n)]
    kept = []
    for point in points:
        got = reductions(point, base, needed)
        if len(got) == len(needed) and min(got.values(), default=1.0) >= min_reduction:
            kept.append(point)
    return kept


def unsafe_refusal_rate(rows: Sequence[Row]) -> float | None:
    """Share of refusals among the measured answers that followed an unsafe verdict (`None` if there is none)."""
    known = [bool(r["gated_refused"]) for r in rows if r.get("gate_unsafe") and r.get("gated_refused") is not None]
    return sum(known) / len(known) if known else None
