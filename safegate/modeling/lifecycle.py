"""Attaching and detaching without a trace: what `SafeGateModel` needs around its own life cycle.

- `check_attachable`: refuse, before anything is touched, a model that already carries a gate (or other PEFT
  layers: a second gate would overwrite the first one's token rows) or a `torch.compile` wrapper.
- `AttachRollback`: an attach that fails half-way (a PEFT error, a probe that raises, Ctrl-C) puts the model and
  the tokenizer back exactly as they were: adapter layers unwrapped, embeddings resized back, flags restored,
  the tokenizer's added safety tokens removed.
- `MergedWeights`: merging LoRA into bf16 weights rounds, and PEFT's unmerge subtracts the delta again, which
  does not give back the original bits; the original weights of the merged layers are kept (on the CPU) and put
  back on unmerge, so `detach()` after `merge_adapter()` returns the original model bit for bit.

Example:
    >>> import safegate
    >>> from safegate.testing import tiny_model_and_tokenizer
    >>> model, tok = tiny_model_and_tokenizer("qwen2")
    >>> gated = safegate.attach(model, tok, safegate.GateConfig(attention_dim=16, lora_r=4))
    >>> check_attachable(model)
    Traceback (most recent call last):
    ...
    ValueError: `model` already has a safety gate (or PEFT adapters) attached: ...
    >>> check_attachable(gated.detach())
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import torch
from torch import nn


def _tuner_layers(model: nn.Module) -> list[str]:
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    return [n for n, m in model.named_modules() if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))]


def check_attachable(model: Any) -> None:
    """Raise `ValueError` if a gate cannot be attached to `model` as it is; nothing is modified."""
    dynamo = sys.modules.get("torch._dynamo.eval_frame")  # not imported: nothing can be compiled
    if dynamo is not None and isinstance(model, dynamo.OptimizedModule):
        raise ValueError(
            "`model` is a torch.compile wrapper (OptimizedModule): attach the gate to the plain model "
            "(`model._orig_mod`), then compile the gated model's backbone if you like."
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a Hugging Face model (torch.nn.Module), got {type(model).__name__}.")
    layers = _tuner_layers(model)
    if layers:
        raise ValueError(
            f"`model` already has a safety gate (or PEFT adapters) attached: `{layers[0]}` is an adapter layer "
            f"({len(layers)} in all). A second gate would overwrite the first one's token rows. Keep using the "
            "SafeGateModel you have, or call `gated.detach()` first to get the plain model back (for a plain PEFT "
            "model: `.unload()`)."
        )


class AttachRollback:
    """What `attach` may change, recorded before it changes anything, and put back by `restore`.

    Args:
        model (`nn.Module`): The model passed to `attach`.
        root (`nn.Module`): The module the gate sits on (`model` itself, or e.g. `model.thinker`).
        tokenizer: The text tokenizer; copied only if it lacks one of `tokens` (then attach will add them).
        tokens (`tuple[str, str]`): The safety token strings.
    """

    def __init__(self, model: nn.Module, root: nn.Module, tokenizer: Any, tokens: tuple[str, str]) -> None:
        from safegate.modeling.tokens import token_id

        self.model, self.root, self.tokenizer = model, root, tokenizer
        self.requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        self.training = {n: m.training for n, m in model.named_modules()}
        self.rows = root.get_input_embeddings().weight.shape[0]
        config = getattr(root, "config", None)
        self.vocab_size = getattr(config.get_text_config(), "vocab_size", None) if config is not None else None
        self.vocab_attr = root.__dict__.get("vocab_size", _ABSENT)
        missing = any(token_id(tokenizer, t) is None for t in tokens)
        self.tokenizer_state = copy.deepcopy(tokenizer.__dict__) if missing else None

    def restore(self, peft_model: nn.Module | None) -> None:
        """Undo everything `attach` did so far (call from its `except`); never raises for a missing step."""
        if peft_model is not None:
            peft_model.unload()
        _unwrap_adapters(self.root)
        if self.root.get_input_embeddings().weight.shape[0] != self.rows:
            self.root.resize_token_embeddings(self.rows, mean_resizing=False)
        if self.vocab_size is not None:
            self.root.config.get_text_config().vocab_size = self.vocab_size
        if self.vocab_attr is _ABSENT:
            self.root.__dict__.pop("vocab_size", None)
        else:
            self.root.__dict__["vocab_size"] = self.vocab_attr
        for name, param in self.model.named_parameters():
            param.requires_grad_(self.requires_grad.get(name, param.requires_grad))
        for name, module in self.model.named_modules():
            module.training = self.training.get(name, module.training)
        if self.tokenizer_state is not None:
            self.tokenizer.__dict__.clear()
            self.tokenizer.__dict__.update(self.tokenizer_state)


_ABSENT = object()


def _unwrap_adapters(root: nn.Module) -> None:
    """Put back the original module of every PEFT layer still in `root` (after a partial injection)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    while True:
        found = next(
            ((n, m) for n, m in root.named_modules() if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))),
            None,
        )
        if found is None:
            break
        name, module = found
        original = module.original_module if isinstance(module, AuxiliaryTrainingWrapper) else module.get_base_layer()
        parent_name, _, child = name.rpartition(".")
        setattr(root.get_submodule(parent_name), child, original)
    if "peft_config" in root.__dict__:
        del root.__dict__["peft_config"]


class MergedWeights:
    """The weights of LoRA's base layers before a merge, on the CPU, put back bit for bit after PEFT's unmerge."""

    def __init__(self, peft_model: nn.Module) -> None:
        from peft.tuners.lora import LoraLayer

        self.saved: list[tuple[nn.Module, str, torch.Tensor]] = []
        for module in peft_model.modules():
            if isinstance(module, LoraLayer) and not module.merged:
                base = module.get_base_layer()
                for name, param in base.named_parameters(recurse=False):
                    self.saved.append((base, name, param.detach().to("cpu", copy=True)))

    @torch.no_grad()
    def restore(self) -> None:
        for module, name, original in self.saved:
            getattr(module, name).copy_(original)
        self.saved = []


def main_input(input_ids: Any, kwargs: dict[str, Any], embed: nn.Module) -> Any:
    """The prompt ids, from `input_ids` or transformers' `inputs` (popped from `kwargs`).

    With `inputs_embeds` too, `input_ids` must be the ids of those embeddings (transformers returns them as the
    prompt): the shapes must agree, and embeddings that are exactly `embed(input_ids)` are dropped from `kwargs`
    (the ids then say the same, and every path of `generate` takes ids).
    """
    if "inputs" in kwargs:
        inputs = kwargs.pop("inputs")
        if input_ids is not None and inputs is not None:
            raise ValueError("pass the prompt once: as `inputs` (transformers' name) or as `input_ids`, not both.")
        if isinstance(inputs, torch.Tensor) and inputs.is_floating_point():
            raise ValueError("`inputs` holds floating-point values: pass embeddings as `inputs_embeds=`.")
        input_ids = inputs if inputs is not None else input_ids
    embeds = kwargs.get("inputs_embeds")
    if input_ids is None or embeds is None:
        return input_ids
    ids = torch.as_tensor(input_ids, device=embeds.device)
    ids = ids.unsqueeze(0) if ids.dim() == 1 else ids
    if tuple(embeds.shape[:2]) != tuple(ids.shape):
        raise ValueError(
            f"`inputs_embeds` has {tuple(embeds.shape[:2])} (batch, positions), `input_ids` {tuple(ids.shape)}: "
            "with both, `input_ids` must be the ids of those embeddings (they start the returned sequences). "
            "Pass only `inputs_embeds`, or ids that match them."
        )
    with torch.no_grad():
        same = torch.equal(embed(ids).to(embeds.dtype), embeds)
    if same:
        del kwargs["inputs_embeds"]
    return input_ids
