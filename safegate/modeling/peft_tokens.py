"""Row-sparse forward for PEFT's trainable-token layers (same numbers, no full-matrix copy per step).

Only the two safety rows differ from the base matrices, so the base layer runs as usual and only the affected
outputs are overwritten (why: `docs/design.md`, "Row-sparse trainable tokens"). Also here: `token_layers`, the
one lookup of the layers that hold the rows, and `output_rows`.

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

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

#: The prefix PEFT puts before the wrapped model's module paths (`PeftModel.base_model.model`).
PEFT_PREFIX = "base_model.model."


def speed_up_trainable_tokens(model: nn.Module) -> int:
    """Swap the forward of every trainable-token layer in `model` for the row-sparse one; return how many."""
    count = 0
    for module in model.modules():
        if type(module).__name__ == "TrainableTokensLayer" and not hasattr(module, "_safegate_peft_forward"):
            # partials of importable functions, not bound methods: a gated model must deep-copy and pickle
            module._safegate_peft_forward = functools.partial(type(module).forward_adapters, module)
            module.forward_adapters = functools.partial(_sparse_forward_adapters, module)
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


def token_layers(peft_model: nn.Module, embed_name: str, head_name: str) -> dict[str, nn.Module]:
    """PEFT's trainable-token layers in `peft_model` that hold rows: `"embed"` and, for an untied head, `"head"`.

    `embed_name` and `head_name` are the module paths inside the wrapped model (`ResolvedArch.module_name`); a
    layer matches when its own path, without PEFT's `base_model.model.` prefix and `.token_adapter` suffix, is one
    of them. Works for LoRA (the layer sits in a wrapper) and tokens-only adapters (the layer replaces the
    module); a tied head's layer only mirrors the embedding's and is left out.

    Example:
        >>> from peft import TrainableTokensConfig, get_peft_model
        >>> from safegate.testing import tiny_model_and_tokenizer
        >>> model, tok = tiny_model_and_tokenizer("llama")
        >>> config = TrainableTokensConfig(target_modules=["embed_tokens", "lm_head"], token_indices=[5])
        >>> sorted(token_layers(get_peft_model(model, config), "model.embed_tokens", "lm_head"))
        ['embed', 'head']
    """
    parts = {embed_name: "embed", head_name: "head"}
    found = {}
    for name, module in peft_model.named_modules():
        if type(module).__name__ != "TrainableTokensLayer" or "default" not in module.trainable_tokens_delta:
            continue
        if getattr(module, "tied_adapter", None) is not None:
            continue
        path = name.removeprefix(PEFT_PREFIX).removesuffix(".token_adapter")
        if path in parts:
            found[parts[path]] = module
    return found


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
