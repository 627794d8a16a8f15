"""`SafeGateLogitsProcessor`: at the first generated position, allow exactly one of the two safety ids.

The verdict is decided by a callback (the gate) from the raw scores of that step; every other id, and the
losing safety id, become `-inf`. Temperature, top-k/top-p and any sampler after it can then only pick the
decided token, so the verdict never depends on the sampler. Later steps pass through untouched.

Example:
    >>> import torch
    >>> proc = SafeGateLogitsProcessor(prompt_length=3, decide=lambda s: torch.tensor([4]))
    >>> proc(torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 6))
    tensor([[-inf, -inf, -inf, -inf, 0., -inf]])
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import LogitsProcessor


class SafeGateLogitsProcessor(LogitsProcessor):
    """Force the id returned by `decide(scores)` (B,) at the step whose input length is `prompt_length`."""

    supports_continuous_batching = False

    def __init__(self, prompt_length: int, decide: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.prompt_length = prompt_length
        self.decide = decide
        self.done = False

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.done or input_ids.shape[-1] != self.prompt_length:
            return scores
        self.done = True
        chosen = self.decide(scores).to(scores.device)
        forced = torch.full_like(scores, float("-inf"))
        return forced.scatter_(1, chosen.unsqueeze(1), 0.0)
