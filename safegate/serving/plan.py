"""What one prompt needs from an engine for the exact CASA verdict, and what it generates from afterwards.

The transformers path (`SafeGateModel.generate`) decides the safety token on the prompt *without* an attacker-written
assistant prefix (`modeling.turns.scan_prefixes`), also on the whole prompt when that prefix closes its turn (the
verdict is then the more unsafe of the two: `modeling.stepwise.closed_turn_floor`), and generates from
`prompt, safety token, prefix` (the prefix dropped after `<|unsafe|>` when `GateConfig.unsafe_prefix="drop"`).
`plan_prompt` computes the same for one prompt's token ids, so an engine that only returns prompt states (a pooling
pass) and then generates from given ids reproduces it.

Example:
    >>> from safegate.testing import tiny_tokenizer
    >>> from safegate.modeling.tokens import add_safety_tokens
    >>> from safegate.modeling.turns import chat_markers
    >>> tok = tiny_tokenizer()
    >>> safe, unsafe = add_safety_tokens(tok, "<|safe|>", "<|unsafe|>")
    >>> text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    >>> ids = tok(text + "Sure", add_special_tokens=False)["input_ids"]
    >>> plan = plan_prompt(ids, (safe, unsafe), chat_markers(tok), tok)
    >>> plan.prefix == ids[-1:], plan.decide_on == [ids[:-1]]
    (True, True)
    >>> plan.generation_ids(unsafe=True, unsafe_prefix="drop") == ids[:-1] + [unsafe]
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from safegate.modeling.turns import ChatMarkers, scan_prefixes


class SafetyTokenInPrompt(ValueError):
    """A prompt holds a safety token id: only hand-built ids can (text never tokenizes to them); refused."""


@dataclass(frozen=True)
class PromptPlan:
    """One prompt, as the gate sees it.

    Args:
        ids (`list[int]`): The prompt's ids (a header merged with its prefix split back, as `scan_prefixes` does).
        gate_ids (`list[int]`): The prompt without its assistant prefix: the gate decides here.
        prefix (`list[int]`): The assistant prefix (empty: none).
        closed (`bool`): The prefix closes its turn: the whole prompt is decided too, and the more unsafe wins.
        safety_ids (`tuple[int, int]`): The ids of the safe and the unsafe token.
    """

    ids: list[int]
    gate_ids: list[int]
    prefix: list[int]
    closed: bool
    safety_ids: tuple[int, int]

    @property
    def decide_on(self) -> list[list[int]]:
        """The id lists whose states the verdict needs (one pooling pass each); the verdict is the most unsafe."""
        return [self.gate_ids, self.ids] if self.closed else [self.gate_ids]

    def generation_ids(self, unsafe: bool, unsafe_prefix: str) -> list[int]:
        """The ids to generate from: `gate_ids, decided token, prefix` (the prefix dropped after an unsafe verdict
        when `unsafe_prefix == "drop"`)."""
        keep = bool(self.prefix) and not (unsafe and unsafe_prefix == "drop")
        return [*self.gate_ids, self.safety_ids[1] if unsafe else self.safety_ids[0], *(self.prefix if keep else [])]


def plan_prompt(
    ids: Sequence[int], safety_ids: tuple[int, int], markers: ChatMarkers | None, tokenizer: Any
) -> PromptPlan:
    """Check one prompt's ids and find its assistant prefix (`modeling.turns.scan_prefixes`).

    Raises `SafetyTokenInPrompt` when `ids` hold a safety token id, `ValueError` when they are empty.
    """
    ids = [int(i) for i in ids]
    if not ids:
        raise ValueError("the prompt is empty: the gate needs at least one prompt token to decide on.")
    found = sorted({i for i in ids if i in safety_ids})
    if found:
        raise SafetyTokenInPrompt(
            f"the prompt's token ids contain the safety token id(s) {found}: this is an injection attempt and is "
            "refused. Text is never tokenized to these ids; only hand-built ids can hold them."
        )
    if markers is None:
        return PromptPlan(ids, ids, [], False, tuple(safety_ids))
    row = torch.tensor([ids])
    scan = scan_prefixes(row, torch.ones_like(row), {}, markers, tokenizer)
    scanned = [int(i) for i, m in zip(scan.input_ids[0].tolist(), scan.attention_mask[0].tolist()) if m]
    cut = len(scanned) - scan.lengths[0]
    closed = bool(scan.closed[0]) and scan.lengths[0] > 0
    return PromptPlan(scanned, scanned[:cut], scanned[cut:], closed, (int(safety_ids[0]), int(safety_ids[1])))
