"""The two safety token rows of the head, as `fit_gate` reads, trains and writes them.

The rows live in a PEFT trainable-tokens layer: the input embedding's when the head is tied to it, the head's
otherwise. `head_rows` reads them as they are; `trainable_head_rows` makes a trainable copy after checking that the
model's logits are a plain dot product with them; `write_head_rows` puts a fitted copy back.

Example:
    >>> import safegate
    >>> from safegate.backbones.tiny import tiny_model_and_tokenizer
    >>> model, tok = tiny_model_and_tokenizer("llama")
    >>> gated = safegate.attach(model, tok, safegate.GateConfig(attention_dim=8, lora_r=2))
    >>> weight, bias = head_rows(gated)
    >>> tuple(weight.shape) == (2, model.config.hidden_size), bias is None
    (True, True)
"""

from __future__ import annotations

from typing import Any

import torch


def token_row_layer(gated: Any) -> Any:
    """The PEFT trainable-tokens layer that holds the two safety rows the head uses (the embedding when tied)."""
    layers = gated.token_layers()
    return layers["embed"] if gated.arch.tied else layers["head"]


def head_rows(gated: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The (safe, unsafe) head rows as they are now, `(2, hidden)` float32, and their head bias (or `None`).

    Pass them as `rows` to `cached_scores` to score a `PromptCache` made before `fit_gate(train_token_rows=True)`
    changed the rows (its cached logits are the old rows').
    """
    delta = token_row_layer(gated).trainable_tokens_delta["default"]
    head_bias = getattr(gated.arch.head, "bias", None)
    bias = None
    if head_bias is not None:
        bias = head_bias.detach()[[gated.safe_token_id, gated.unsafe_token_id]].float()
    return delta.detach().float().clone(), bias


def trainable_head_rows(
    gated: Any, last_hidden: torch.Tensor, logits: torch.Tensor
) -> tuple[torch.nn.Parameter, torch.Tensor | None]:
    """Trainable copy of the rows; checks that cached `logits` are a plain dot product of `last_hidden` with them."""
    current, bias = head_rows(gated)
    weight = torch.nn.Parameter(current)
    expected = last_hidden.to(weight.device) @ weight.detach().t() + (0 if bias is None else bias)
    if not torch.allclose(expected, logits.to(weight.device), atol=1e-3, rtol=1e-3):
        raise ValueError(
            "`train_token_rows=True` needs logits that are a plain dot product of the last hidden state with the "
            "head rows, but this model transforms them (logit scaling or soft-capping). Use "
            "`train_token_rows=False`, or train the rows with `safegate.train`."
        )
    return weight, bias


@torch.no_grad()
def write_head_rows(gated: Any, rows: tuple[torch.nn.Parameter, torch.Tensor | None]) -> None:
    """Copy fitted rows (`trainable_head_rows`' first element) back into the model."""
    delta = token_row_layer(gated).trainable_tokens_delta["default"]
    delta.copy_(rows[0].to(delta.dtype))
