"""Phrasing augmentation: instructions rewritten as questions or casual requests, labels kept.

A gate trained on imperative "Write a tutorial on how to ..." prompts learns that phrasing, not the harm
(docs/generalization.md). `augment_phrasing` adds, for a share of the rewritable records, a copy whose prompt asks
the same thing in another form ("Can you ...?", "How do I ...?", "how to ...").

Example:
    >>> import random
    >>> rephrase("Write a poem about the sea.", random.Random(1))
    'Can you write a poem about the sea?'
    >>> records = [{"prompt": "Explain photosynthesis.", "label": "safe", "source": "alpaca"}]
    >>> [r["prompt"] for r in augment_phrasing(records, share=1.0)]
    ['Explain photosynthesis.', 'I want to explain photosynthesis. How?']
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

#: Forms an instruction is rewritten into (`{p}`: the instruction, first letter lower-cased, end punctuation cut).
WRAPPERS: tuple[str, ...] = (
    "How do I {p}?",
    "Can you {p}?",
    "What's the best way to {p}?",
    "I want to {p}. How?",
    "how to {p}",
    "Tell me how I can {p}.",
)


def rephrase(prompt: str, rng: random.Random) -> str:
    """`prompt` (an instruction) as a question or a casual request: "Write a poem." -> "Can you write a poem?"."""
    body = prompt.rstrip(" .!?")
    return rng.choice(WRAPPERS).format(p=body[:1].lower() + body[1:])


def default_rewritable(record: dict[str, Any]) -> bool:
    """Harmful prompts and Alpaca tasks, not prompts wrapped in a jailbreak template (their wording is the attack)."""
    return record.get("augmented") != "template" and (
        record.get("label") == "unsafe" or record.get("source") == "alpaca"
    )


def augment_phrasing(
    records: Sequence[dict[str, Any]],
    share: float = 0.5,
    seed: int = 0,
    rewritable: Callable[[dict[str, Any]], bool] = default_rewritable,
) -> list[dict[str, Any]]:
    """`records` followed by a rephrased copy of about `share` of the rewritable ones (`augmented="phrasing"`).

    Copies keep every field but the prompt (and drop `response`: an answer to the original wording may not fit);
    the draw is deterministic for a given `seed`.
    """
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"augment_phrasing: `share` must be in [0, 1], got {share!r}; pass e.g. share=0.5.")
    rng = random.Random(seed)
    out = [dict(r) for r in records]
    for record in records:
        if rewritable(record) and rng.random() < share:
            copy = {k: v for k, v in record.items() if k != "response"}
            out.append({**copy, "prompt": rephrase(record["prompt"], rng), "augmented": "phrasing"})
    return out
