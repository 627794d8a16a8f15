"""Strict checks of a bundle: its own tensors agree, and it fits a model's backbone, tokenizer and LoRA modules.

Every check only reads; a misfit raises `BundleMismatchError` naming the field, the bundle's value and the model's
(rules: `docs/bundle-format.md`, "Loading is strict").

Example:
    >>> import safegate
    >>> from safegate.hub.bundle import SafeGateBundle
    >>> from safegate.testing import tiny_model_and_tokenizer
    >>> model, tok = tiny_model_and_tokenizer("qwen2")
    >>> gated = safegate.attach(model, tok, safegate.GateConfig(attention_dim=16, lora_r=4))
    >>> bundle = SafeGateBundle.from_model(gated)
    >>> other, other_tok = tiny_model_and_tokenizer("llama")
    >>> try:
    ...     check_fits(bundle, other, other_tok)
    ... except BundleMismatchError as err:
    ...     err.field
    'gated_model_type'
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from peft import PeftModel
from torch import nn

from safegate.hub.files import ADAPTER_WEIGHTS_NAME, FINGERPRINT, WEIGHTS_NAME, BundleError, BundleMismatchError
from safegate.hub.schema import check_gate_tensors, check_tensor_values
from safegate.modeling.arch import ResolvedArch, model_type_of, resolve
from safegate.modeling.config import GateConfig
from safegate.modeling.gate_ensemble import query_name
from safegate.modeling.lifecycle import check_attachable
from safegate.modeling.model import SafeGateModel
from safegate.modeling.peft_tokens import PEFT_PREFIX
from safegate.modeling.tokens import check_protected, text_tokenizer, token_id

if TYPE_CHECKING:
    from safegate.hub.bundle import SafeGateBundle

_DELTA = "trainable_tokens_delta"
_LORA_KEY = re.compile(re.escape(PEFT_PREFIX) + r".+\.lora_(?P<ab>[AB])\.weight")


def delta_key(tensors: Mapping[str, torch.Tensor], module: str) -> str | None:
    """Key of the token rows of `module` in PEFT's adapter state (LoRA wrapper or tokens-only layer), or `None`."""
    for key in (f"{PEFT_PREFIX}{module}.token_adapter.{_DELTA}", f"{PEFT_PREFIX}{module}.{_DELTA}"):
        if key in tensors:
            return key
    return None


def check_tensors(bundle: SafeGateBundle) -> None:
    """Raise `BundleError` unless both safetensors files hold exactly the expected tensors (names, shapes, finite
    floating-point values), and agree on the rows."""
    cfg, hidden = bundle.gate_config, bundle.backbone["hidden_size"]
    token_keys = {f"tokens.{part}.{t}" for part in bundle.token_modules for t in (cfg.safe_token, cfg.unsafe_token)}
    query = f"gate.{query_name(cfg)}"
    missing = sorted(token_keys - set(bundle.tensors)) + ([query] if query not in bundle.tensors else [])
    unexpected = sorted(k for k in set(bundle.tensors) - token_keys if not k.startswith("gate."))
    if missing or unexpected:
        raise BundleError(f"{WEIGHTS_NAME}: missing tensors {missing}, unexpected tensors {unexpected}.")
    bad = [k for k in [*token_keys, query] if tuple(bundle.tensors[k].shape) != (hidden,)]
    if bad:
        raise BundleError(f"{WEIGHTS_NAME}: tensors {bad} do not have the backbone's hidden size {hidden}.")
    check_tensor_values(bundle.tensors, WEIGHTS_NAME)
    check_tensor_values(bundle.adapter_tensors, ADAPTER_WEIGHTS_NAME)
    check_gate_tensors(bundle.tensors, cfg, hidden, WEIGHTS_NAME)
    deltas = {delta_key(bundle.adapter_tensors, module) for module in bundle.token_modules.values()}
    for key, tensor in bundle.adapter_tensors.items():
        lora = _LORA_KEY.fullmatch(key)
        if key in deltas or (lora and cfg.lora_r and tensor.shape[0 if lora["ab"] == "A" else -1] == cfg.lora_r):
            continue
        raise BundleError(
            f"{ADAPTER_WEIGHTS_NAME}: unexpected tensor `{key}` {tuple(tensor.shape)}: a bundle's adapter holds only "
            f"LoRA A/B of rank lora_r={cfg.lora_r} and the token rows. Re-export the bundle."
        )
    for part, module in bundle.token_modules.items():
        key = delta_key(bundle.adapter_tensors, module)
        if key is None:
            raise BundleError(f"{ADAPTER_WEIGHTS_NAME} lacks the {part} token rows of `{module}`.")
        if not torch.equal(bundle.adapter_tensors[key], bundle.token_rows(part)):
            raise BundleError(
                f"the {part} token rows in {ADAPTER_WEIGHTS_NAME} differ from {WEIGHTS_NAME}: the bundle was "
                "edited by hand or is corrupt. Re-export it."
            )


def backbone_identity(gated: SafeGateModel) -> dict[str, Any]:
    """The backbone fields a bundle and a merged export both record: types, module names, name, sizes, dtype."""
    arch = gated.arch
    return {
        "model_type": model_type_of(gated.original_model),
        "gated_model_type": model_type_of(arch.root),
        "gated_module": arch.spec.unwrap or "",
        "name_or_path": str(getattr(getattr(gated.original_model, "config", None), "name_or_path", "") or ""),
        "hidden_size": int(arch.embed.weight.shape[1]),
        "num_layers": len(arch.layers),
        "tied": bool(arch.tied),
        "embed_module": gated.embed_module_name,
        "head_module": gated.head_module_name,
        "dtype": str(arch.embed.weight.dtype).removeprefix("torch."),
    }


def check_fits(bundle: SafeGateBundle, model: nn.Module, tokenizer_or_processor: Any) -> GateConfig:
    """Raise `BundleMismatchError` if `bundle` does not fit `model`; return the GateConfig to attach with."""
    if isinstance(model, (SafeGateModel, PeftModel)):
        raise TypeError(f"`model` is a {type(model).__name__}; load a bundle onto the plain Hugging Face model.")
    check_attachable(model)  # a model that already carries a gate says so (not "another backbone")
    cfg, b = bundle.gate_config, bundle.backbone
    arch = resolve(model, cfg.lora_target, cfg.lora_modules)
    live = {
        "gated_model_type": model_type_of(arch.root),
        "hidden_size": int(arch.embed.weight.shape[1]),
        "num_layers": len(arch.layers),
        "vocab_rows": int(arch.embed.weight.shape[0]),
        "tied": bool(arch.tied),
    }
    diffs = [(f, b[f], live[f]) for f in FINGERPRINT if b[f] != live[f]]
    if diffs:
        base = b["name_or_path"] or b["model_type"]
        hint = f"Load it onto the backbone it was trained for ({base}) or train a gate for this one."
        raise BundleMismatchError(*diffs[0], hint=hint, others=diffs[1:])
    check_tokenizer(cfg, text_tokenizer(tokenizer_or_processor), live["vocab_rows"])
    target = check_lora_modules(bundle, arch)
    return cfg if target in (None, arch.lora_target) else dataclasses.replace(cfg, lora_target=target)


def check_tokenizer(cfg: GateConfig, tokenizer: Any, rows: int) -> None:
    """Raise unless text cannot spell the safety tokens and every id of `tokenizer` has one of the `rows`."""
    for field, token in (("safe_token", cfg.safe_token), ("unsafe_token", cfg.unsafe_token)):
        tid = token_id(tokenizer, token)
        if tid is None:
            continue
        try:
            check_protected(tokenizer, {token: tid})
        except RuntimeError as err:
            raise BundleMismatchError(
                field, token, f"an added token that text can spell (id {tid})", hint=str(err)
            ) from err
    safety = {cfg.safe_token, cfg.unsafe_token}
    top = max((i for t, i in tokenizer.get_vocab().items() if t not in safety), default=-1)
    if top >= rows:
        raise BundleMismatchError(
            "tokenizer_vocab", f"< {rows} (the model's embedding rows)", top + 1,
            hint="The tokenizer holds ids the model has no rows for: it does not belong to this model.",
        )  # fmt: skip


def check_lora_modules(bundle: SafeGateBundle, arch: ResolvedArch) -> str | None:
    """Raise unless the LoRA tensors fit `arch`'s linear layers exactly; return the bundle's regex target if any."""
    target = getattr(bundle.adapter_config, "target_modules", None)
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, tensor in bundle.adapter_tensors.items():
        if ".lora_" in key:
            module, _, rest = key.removeprefix(PEFT_PREFIX).partition(".lora_")
            shapes.setdefault(module, {})[rest.split(".")[0]] = tuple(tensor.shape)
    if not shapes:
        return None
    modules = dict(arch.root.named_modules())
    missing = sorted(m for m in shapes if not isinstance(modules.get(m), nn.Linear))
    extra = sorted(n for n in modules if isinstance(target, str) and re.fullmatch(target, n) and n not in shapes)
    if missing or extra:
        model_value = f"absent: {missing[:3]}" if missing else f"also has {extra[:3]} ({len(extra)} in all)"
        raise BundleMismatchError(
            "lora_target_modules", f"{len(shapes)} modules matching {target!r}", model_value,
            hint="The model's decoder is not the one the LoRA adapter was trained on.",
        )  # fmt: skip
    rank = bundle.gate_config.lora_r
    for module, parts in sorted(shapes.items()):
        linear = modules[module]
        want = {"A": (rank, linear.in_features), "B": (linear.out_features, rank)}
        if any(parts.get(k) != v for k, v in want.items()):
            raise BundleMismatchError(f"lora shape of `{module}`", parts, want)
    return target if isinstance(target, str) else None
