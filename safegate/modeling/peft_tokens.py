"""Row-sparse forward for PEFT's trainable-token layers (same numbers, no full-matrix copy per step).

PEFT's `TrainableTokensLayer` rebuilds the whole embedding (and head) matrix with `index_copy` on every forward,
so each generated token copies `vocab x hidden` values twice, and training back-propagates a dense gradient into
that copy. Only two rows differ here, so safegate computes the base layer as usual and then overwrites only the
affected outputs: embedding positions that hold a trained id, and logit columns of the trained ids (overwritten at
inference; in training the difference to the base columns is added, whose backward needs no full-size copy).
`tests/test_fast_tokens.py` checks outputs and gradients against PEFT's own path.

Example:
    >>> import torch
    >>> from peft import TrainableTokensConfig, get_peft_model
    >>> from safegate.testing import tiny_model_and_tokenizer
    >>> model, tok = tiny_model_and_tokenizer("llama")
    >>> peft_model = get_peft_model(model, TrainableTokensConfig(target_modules=["embed_tokens"], token_indices=[5]))
    >>> speed_up_trainable_tokens(peft_model)
    1
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def speed_up_trainable_tokens(model: nn.Module) -> int:
    """Swap the forward of every trainable-token layer in `model` for the row-sparse one; return how many."""
    count = 0
    for module in model.modules():
        if type(module).__name__ == "TrainableTokensLayer" and not hasattr(module, "_safegate_peft_forward"):
            module._safegate_peft_forward = module.forward_adapters
            module.forward_adapters = types.MethodType(_sparse_forward_adapters, module)
            count += 1
    return count


def _sparse_forward_adapters(self: Any, x: torch.Tensor, active_adapters: list[str], *args: Any, **kwargs: Any):
    base = self.base_layer
    if self.disable_adapters or not active_adapters or self.merged or len(active_adapters) != 1:
        return self._safegate_peft_forward(x, active_adapters, *args, **kwargs)
    name = active_adapters[0]
    rows = self.trainable_tokens_delta[name]
    index = torch.tensor(self.token_indices[name], device=rows.device)
    if isinstance(base, nn.Embedding):
        out = base(x, *args, **kwargs)
        match = x.unsqueeze(-1) == index  # (..., k)
        values = match.to(out.dtype) @ rows.to(out.dtype)
        scale = self._get_embed_scale()
        if scale is not None:
            values = values * scale.to(out.dtype)
        return torch.where(match.any(-1, keepdim=True), values, out)
    if isinstance(base, nn.Linear):
        out = base(x, *args, **kwargs)
        if not (torch.is_grad_enabled() and rows.requires_grad):
            columns = F.linear(x, rows.to(x.dtype))
            return out.index_copy_(-1, index, columns.to(out.dtype))  # in place: linear needs no output for backward
        # training: add the difference to the base columns instead of overwriting them; the backward of an in-place
        # add passes the gradient through unchanged, where overwriting clones the whole (positions, vocab) gradient
        correction = F.linear(x, (rows - base.weight[index].detach()).to(x.dtype))
        return out.index_add_(-1, index, correction.to(out.dtype))
    return self._safegate_peft_forward(x, active_adapters, *args, **kwargs)


def output_rows(head: nn.Module, ids: list[int]) -> torch.Tensor | None:
    """The weight rows by which `head` turns a state into the logits of `ids` (k, d), or `None` if it cannot tell.

    Knows a bias-free `nn.Linear` and PEFT's trainable-token layer (or its wrapper) around one, merged or not, with
    one active adapter:
    the logits of a few ids then cost a (k, d) product instead of a full-vocabulary one.

    Example:
        >>> head = nn.Linear(4, 10, bias=False)
        >>> torch.equal(output_rows(head, [3, 7]), head.weight[[3, 7]])
        True
    """
    if type(head) is nn.Linear:
        return head.weight[ids] if head.bias is None else None
    if type(head).__name__ == "TrainableTokensWrapper":  # PEFT's wrapper forwards to its `token_adapter`
        return None if head.disable_adapters else output_rows(head.token_adapter, ids)
    if type(head).__name__ != "TrainableTokensLayer" or type(head.base_layer) is not nn.Linear:
        return None
    base = head.base_layer
    if head.disable_adapters or base.bias is not None:
        return None
    if head.merged:  # merging copied the trained rows into the base weight
        return base.weight[ids]
    if len(head.active_adapters) != 1:
        return None
    name = head.active_adapters[0]
    trained = list(head.token_indices[name])
    delta = head.trainable_tokens_delta[name]
    return torch.stack([delta[trained.index(i)] if i in trained else base.weight[i] for i in ids])
