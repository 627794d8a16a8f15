"""Prefill attacks: find an attacker-written assistant prefix so the gate can decide before it.

A prompt built with `add_generation_prompt=True` ends with the assistant header (`<|im_start|>assistant\\n`); text
after it is an assistant prefix ("Sure, here is"). safegate decides the safety token on the prompt up to the header,
then feeds `header, safety token, prefix`. The gate finds prefixes with `modeling.turns.scan_prefixes` (headers
only where a chat template puts them, merged headers, special tokens in a prefix); `prefix_lengths` here is the
plain ids match that tools and tests use on prompts they built themselves. This module also holds the row helpers
the prefix paths share.

Example:
    >>> import torch
    >>> prefix_lengths(torch.tensor([[5, 1, 2, 7, 8]]), torch.ones(1, 5), header=[1, 2], special_ids={1})
    [2]
"""

from __future__ import annotations

from typing import Any

import torch


def assistant_header(tokenizer: Any, processor: Any = None) -> list[int] | None:
    """Token ids the chat template appends for `add_generation_prompt=True`, or `None` if it cannot tell."""
    messages = [{"role": "user", "content": "Hi"}]
    for owner in (tokenizer, processor):
        if owner is None or not getattr(owner, "chat_template", None):
            continue
        try:
            with_header = owner.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            without = owner.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        except Exception:  # noqa: BLE001 - templates may reject the probe; then no prefix detection
            continue
        if isinstance(with_header, list):
            with_header, without = with_header[0], without[0]
        if with_header.startswith(without) and len(with_header) > len(without):
            ids = tokenizer(with_header[len(without) :], add_special_tokens=False)["input_ids"]
            return list(ids) or None
    return None


def special_ids(tokenizer: Any) -> set[int]:
    """Ids of every special token (turn markers, pads, placeholders) of `tokenizer`."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        ids |= {i for i, tok in backend.get_added_tokens_decoder().items() if tok.special}
    return ids


def prefix_lengths(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, header: list[int], special_ids: set[int]
) -> list[int]:
    """Per row, the number of tokens after the last assistant header (0 when there is no plain-text prefix).

    Ids only, for prompts a tool built itself; the gate reads the chat structure instead (`turns.scan_prefixes`)."""
    h = len(header)
    if input_ids.shape[1] >= h and bool((input_ids[:, -h:] == torch.tensor(header, device=input_ids.device)).all()):
        return [0] * input_ids.shape[0]  # the common case: every row ends with the header
    lengths = []
    for row, mask in zip(input_ids.tolist(), attention_mask.tolist()):
        tokens = [t for t, m in zip(row, mask) if m]
        start = _last_index(tokens, header)
        suffix = tokens[start + h :] if start >= 0 else []
        lengths.append(0 if any(t in special_ids for t in suffix) else len(suffix))
    return lengths


def _last_index(tokens: list[int], pattern: list[int]) -> int:
    for i in range(len(tokens) - len(pattern), -1, -1):
        if tokens[i : i + len(pattern)] == pattern:
            return i
    return -1


def inserted_token_value(key: str, before: torch.Tensor) -> tuple[torch.Tensor, int]:
    """What a token inserted after `before` (the row's values up to it, last one on the last axis; may be empty)
    gets in the per-token input `key`, and how much the values after it move: the next position in
    `position_ids`, 0 (text) in any other per-token input such as `mm_token_type_ids`.

    Example:
        >>> inserted_token_value("position_ids", torch.tensor([[3, 4]])[:, -1:])
        (tensor([[5]]), 1)
    """
    if key == "position_ids":
        if before.shape[-1] == 0:
            return before.new_zeros((*before.shape[:-1], 1)), 1
        return before[..., -1:] + 1, 1
    return before.new_zeros((*before.shape[:-1], 1)), 0


def repeat_rows(value: Any, repeats: int, dim: int = 0) -> Any:
    """Each row of a tensor `value` repeated `repeats` times along `dim` (`num_return_sequences` expands rows so);
    `value` itself when there is nothing to repeat or it is not a tensor.

    Example:
        >>> repeat_rows(torch.tensor([1, 2]), 2)
        tensor([1, 1, 2, 2])
    """
    if repeats == 1 or not isinstance(value, torch.Tensor):
        return value
    return value.repeat_interleave(repeats, dim=dim)


def left_pad(rows: list[torch.Tensor], value: float | int) -> torch.Tensor:
    """Stack 1-D (or (n, ...)) rows into one tensor, padding on the left with `value`."""
    width = max(r.shape[0] for r in rows)
    out = rows[0].new_full((len(rows), width, *rows[0].shape[1:]), value)
    for i, r in enumerate(rows):
        out[i, width - r.shape[0] :] = r
    return out
