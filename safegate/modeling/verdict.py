"""The gate's verdict for one `generate` call and how it is attached to the output object.

Example:
    >>> import torch
    >>> from types import SimpleNamespace
    >>> verdict = Verdict(p_unsafe=torch.tensor([0.1, 0.9]), unsafe=torch.tensor([False, True]))
    >>> out = attach_verdict(SimpleNamespace(sequences=None), verdict)
    >>> out.safety, out.safety_scores.tolist() == verdict.p_unsafe.tolist()
    (['safe', 'unsafe'], True)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

SAFE, UNSAFE = "safe", "unsafe"


@dataclass
class Verdict:
    """What the gate decided for one call, one entry per returned row.

    `scores` and `last_states` are filled only on the speculative path: the raw logits at the safety step when the
    prefill returned them, else the final states there (projected only when the caller asks for scores).
    """

    p_unsafe: torch.Tensor | None = None
    unsafe: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    last_states: torch.Tensor | None = None

    @property
    def labels(self) -> list[str]:
        """`"safe"` / `"unsafe"` per row."""
        if self.unsafe is None:
            raise RuntimeError("the gate has not decided yet")
        return [UNSAFE if u else SAFE for u in self.unsafe.tolist()]


def attach_verdict(out: Any, verdict: Verdict) -> Any:
    """Set `out.safety` (labels per row) and `out.safety_scores` (p(unsafe) per row) on a generate output."""
    out.safety = verdict.labels
    out.safety_scores = verdict.p_unsafe
    return out
