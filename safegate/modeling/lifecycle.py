"""Attaching and detaching without a trace: what `SafeGateModel` needs around its own life cycle.

- `check_attachable`: refuse, before anything is touched, a model that already carries a gate (or other PEFT
  layers: a second gate would overwrite the first one's token rows) or a `torch.compile` wrapper.
- `AttachRollback`: an attach that fails half-way (a PEFT error, a probe that raises, Ctrl-C) puts the model and
  the tokenizer back exactly as they were: adapter layers unwrapped, embeddings resized back, flags restored,
  the tokenizer's added safety tokens removed.
- `MergedWeights`: merging LoRA into bf16 weights rounds, and PEFT's unmerge subtracts the delta again, which
  does not give back the original bits; the original weights of the merged layers are kept (on the CPU) and put
  back on unmerge, so `detach()` after `merge_adapter()` returns the original model bit for bit.
- `GateLifecycle`: `SafeGateModel`'s merging, detaching, deep-copying and pickling (a mixin).

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

import contextlib
import copy
import sys
import threading
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
        self.tokenizer_state = None
        if any(token_id(tokenizer, t) is None for t in tokens):  # attach will add them
            try:
                self.tokenizer_state = copy.deepcopy(tokenizer.__dict__)
            except Exception:  # noqa: BLE001 - an exotic attribute: BPE tokenizers only swap `_tokenizer`
                self.tokenizer_state = dict(tokenizer.__dict__)

    def restore(self, peft_model: nn.Module | None) -> None:
        """Undo everything `attach` did so far (call from its `except`); never raises for a missing step."""
        if peft_model is not None:
            with contextlib.suppress(Exception):  # whatever PEFT could not unload is unwrapped below
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
                    if param.is_floating_point():  # quantized storage is left to PEFT's own unmerge
                        self.saved.append((base, name, param.detach().to("cpu", copy=True)))

    @torch.no_grad()
    def restore(self) -> None:
        for module, name, original in self.saved:
            getattr(module, name).copy_(original)
        self.saved = []


class GateLifecycle:
    """Merging, detaching, copying and pickling of a `SafeGateModel` (a mixin; the state is the model's)."""

    def merge_adapter(self) -> None:
        """Merge LoRA into the base weights for faster inference (PEFT naming; undo with `unmerge_adapter`).

        The merged layers' original weights are kept on the CPU, so unmerging (and `detach`) gives them back bit for
        bit; subtracting the delta again would not, in bf16.
        """
        self._check_attached()
        if not self.merged:
            self.__dict__["_merged_weights"] = MergedWeights(self.peft_model)
            self.peft_model.merge_adapter()

    def unmerge_adapter(self) -> None:
        """Undo `merge_adapter`: separate LoRA weights again, base weights exactly as before the merge."""
        self._check_attached()
        if self.merged:
            self.peft_model.unmerge_adapter()
        saved = self.__dict__.pop("_merged_weights", None)
        if saved is not None:
            saved.restore()

    @property
    def merged(self) -> bool:
        """Whether LoRA and the token rows are currently merged into the base weights."""
        return any(getattr(m, "merged", False) for m in self.peft_model.modules() if hasattr(m, "merged_adapters"))

    def _check_attached(self) -> None:
        if self._detached:
            raise RuntimeError("this SafeGateModel was detached; call safegate.attach(model, tokenizer) again.")

    def detach(self) -> nn.Module:
        """Remove LoRA, token rows and any resize; return the original model exactly as before `attach()`."""
        self._check_attached()
        self.unmerge_adapter()
        root = self.peft_model.unload()
        if root.get_input_embeddings().weight.shape[0] != self._original_rows:
            root.resize_token_embeddings(self._original_rows, mean_resizing=False)
        for name, param in root.named_parameters():
            param.requires_grad_(self._requires_grad.get(name, param.requires_grad))
        self._detached = True
        del self._modules["peft_model"]
        return self._original

    def __getstate__(self) -> dict[str, Any]:
        """`copy.deepcopy` and `pickle`: everything but the per-thread verdicts of the last calls."""
        return {k: v for k, v in self.__dict__.items() if k != "_thread_state"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # type: ignore[misc]
        self.__dict__["_thread_state"] = threading.local()
