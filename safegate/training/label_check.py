"""Training data without both labels teaches the gate a constant: `train` warns, `fit_gate` refuses.

The counts name how many gate records of each label were found (`gate: false` rows never teach the gate and are not
counted), so the fix is obvious: add records of the missing label.

Example:
    >>> label_counts([{"label": "unsafe"}, {"label": "unsafe"}, {"label": "safe", "gate": False}])
    {'safe': 0, 'unsafe': 2}
    >>> single_label_message(label_counts([{"label": "unsafe"}]), "training data")
    "training data lacks a label: 0 'safe' and 1 'unsafe' gate records; the model can only learn a constant \
verdict. Add 'safe' records."
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

LABELS = ("safe", "unsafe")


def label_counts(records: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """How many gate records (`gate` not false) carry each label."""
    counts = dict.fromkeys(LABELS, 0)
    for record in records:
        if record.get("gate", True) and record.get("label") in counts:
            counts[record["label"]] += 1
    return counts


def single_label_message(counts: Mapping[str, int], what: str) -> str | None:
    """The message for data with fewer than two labels, or `None` when both labels are present."""
    missing = [label for label in LABELS if not counts.get(label)]
    if not missing:
        return None
    found = " and ".join(f"{counts.get(label, 0)} {label!r}" for label in LABELS)
    add = " and ".join(repr(label) for label in missing)
    return (
        f"{what} lacks a label: {found} gate records; the model can only learn a constant verdict. Add {add} records."
    )
