"""The verdict from a pooling pass's states, shared by the offline (`GatedLLM`) and online (`safegate serve`) paths.

A vLLM pooling engine built with `POOLER_CONFIG` returns, per prompt, the final norm's output at every position
(`token_embed` without its activation: no normalisation). That is the gate's input when it taps the final norm, and
the raw safety logits at the last prompt position are the head's two safety rows times its last row
(`serving.checkpoint.safety_head_rows`); `hub.merged.merged_verdict` then decides exactly as the transformers path.

Example:
    >>> import torch
    >>> most_unsafe([("safe", 0.2), ("unsafe", 0.6)])
    ('unsafe', 0.6)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from safegate.hub.merged import MergedGate, merged_verdict
from safegate.modeling.verdict import SAFE, UNSAFE
from safegate.serving.tap import split_states

#: The pooling engine's config: every position's final-norm state, unnormalised.
POOLER_CONFIG = {"task": "token_embed", "use_activation": False}


def pooling_params() -> Any:
    """vLLM `PoolingParams` for one request of the pooling engine (imports vLLM)."""
    from vllm.pooling_params import PoolingParams

    return PoolingParams(task="token_embed", use_activation=False)


def states_verdict(
    gate: MergedGate, rows: torch.Tensor, states: torch.Tensor, n_ids: int, threshold: float | None
) -> tuple[str, float]:
    """`(verdict, p_unsafe)` from one prompt's pooled states `(n_ids, hidden)`: the final norm's output, preceded by
    the tapped layer's states (`(n_ids, 2 * hidden)`) when the gate taps an inner layer (`serving.tap`)."""
    if states.dim() != 2 or states.shape[0] != n_ids:
        raise RuntimeError(
            f"the pooling pass returned states of shape {tuple(states.shape)} for a prompt of {n_ids} ids; "
            "expected one state per prompt position (was prefix caching or a different pooler configured?)"
        )
    tapped, final = split_states(states.float(), gate.hidden_size, gate.tapped_layer)
    return merged_verdict(gate, tapped, rows.to(final.device) @ final[-1], threshold)


def most_unsafe(decisions: Sequence[tuple[str, float]]) -> tuple[str, float]:
    """The verdict of a prompt decided on several id lists (a prefix that closes its turn): unsafe if any is, and
    the largest p(unsafe) (`modeling.stepwise.closed_turn_floor`)."""
    unsafe = any(label == UNSAFE for label, _ in decisions)
    return (UNSAFE if unsafe else SAFE), max(p for _, p in decisions)
