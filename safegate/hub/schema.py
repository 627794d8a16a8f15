"""The strict schema of a bundle: every field of its two JSON files and every tensor, checked before anything is touched.

A bundle can come from anywhere (a Hub repo, a hand-edited folder), so nothing in it is trusted: each field must
have its documented type and range, the adapter config must describe what safegate itself writes, and every tensor
must be a finite floating-point tensor of the shape the config implies. Each failure is a `BundleError` that names
the file, the field or tensor, the value found and what is expected (`docs/bundle-format.md`).

Example:
    >>> check_adapter_config({"peft_type": "PROMPT_TUNING"}, GateConfig())
    Traceback (most recent call last):
    ...
    safegate.hub.files.BundleError: adapter/adapter_config.json is not a valid PEFT adapter config for this gate: `peft_type` is 'PROMPT_TUNING', expected 'LORA' (the gate config has lora_r=8). Re-export the bundle with `gated.save_bundle(...)` instead of editing it by hand.
"""  # noqa: E501

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import torch

from safegate.hub.files import (
    ADAPTER_CONFIG_NAME,
    CHECKSUMMED,
    CONFIG_NAME,
    FORMAT,
    SCHEMA_VERSION,
    BundleError,
)
from safegate.modeling.config import GateConfig
from safegate.modeling.gate import SafetyGate
from safegate.modeling.gate_ensemble import build_gate

_FIX = "Re-export the bundle with `gated.save_bundle(...)` instead of editing it by hand."
_STR, _INT, _BOOL, _NUMBER = "a string", "an integer", "true or false", "a number"
# backbone field -> (expected kind, required)
_BACKBONE = {
    "model_type": (_STR, True),
    "gated_model_type": (_STR, True),
    "name_or_path": (_STR, True),
    "hidden_size": (_INT, True),
    "num_layers": (_INT, True),
    "vocab_rows": (_INT, True),
    "tied": (_BOOL, True),
    "embed_module": (_STR, True),
    "head_module": (_STR, True),
    "gated_module": (_STR, False),
    "vocab_rows_gated": (_INT, False),
    "dtype": (_STR, False),
}
_GATE_KINDS = {
    "safe_token": _STR, "unsafe_token": _STR, "attention_dim": _INT, "aggregation": _STR, "scaling": _STR,
    "layer": _INT, "descriptor": _STR, "train_query": _BOOL, "threshold": _NUMBER, "lora_r": _INT,
    "lora_alpha": _INT, "lora_modules": "a list of strings", "lora_dropout": _NUMBER, "lora_target": _STR,
    "safety_prompt": _STR, "unsafe_prefix": _STR, "members": _INT,
}  # fmt: skip
_OPTIONAL_NONE = {"threshold", "lora_target", "safety_prompt"}
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _fail(file: str, field: str, value: Any, expected: str) -> BundleError:
    shown = f"{value!r}" if len(repr(value)) <= 80 else f"{repr(value)[:77]}..."
    shown = "missing (or null)" if value is None else shown
    where = f"{file} is not a valid PEFT adapter config for this gate:" if file == ADAPTER_CONFIG_NAME else f"{file}:"
    return BundleError(f"{where} `{field}` is {shown}, expected {expected}. {_FIX}")


def _is(kind: str, value: Any) -> bool:
    if kind == _STR:
        return isinstance(value, str)
    if kind == _INT:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == _BOOL:
        return isinstance(value, bool)
    if kind == _NUMBER:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, list) and all(isinstance(v, str) and v for v in value)  # a list of strings


def _section(config: Mapping, key: str, required: bool = True) -> dict[str, Any] | None:
    value = config.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, dict):
        raise _fail(CONFIG_NAME, key, value, "an object" + ("" if required else " or null"))
    return value


def check_config(config: Any, *, with_files: bool = False) -> dict[str, Any]:
    """Return `config` (the parsed `safegate_config.json`) if every field has its documented type and range.

    `with_files=True` also requires the `files` records (size and sha256 of both safetensors files), which a bundle
    read from disk has and one built in memory does not.
    """
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise BundleError(f"{CONFIG_NAME} is not a safegate bundle config (`format` is {found!r}, not {FORMAT!r}).")
    version = config.get("schema_version")
    if version != SCHEMA_VERSION or isinstance(version, bool):
        versions = config.get("versions")
        writer = versions.get("safegate", "an unknown version") if isinstance(versions, dict) else "an unknown version"
        raise BundleError(
            f"unknown bundle `schema_version` {version!r} (written by safegate {writer}); this safegate reads "
            f"schema_version {SCHEMA_VERSION}. Upgrade safegate, or re-export the bundle with this version."
        )
    for key in ("backbone", "tokens", "gate_config"):
        if not isinstance(config.get(key), dict):
            raise BundleError(f"{CONFIG_NAME} lacks the `{key}` section (an object), found {config.get(key)!r}.")
    backbone = _check_backbone(config["backbone"])
    gate_config = _check_gate_config(config["gate_config"], backbone["num_layers"])
    _check_tokens(config["tokens"], gate_config)
    if config.get("threshold") != gate_config.threshold:
        raise BundleError(
            f"{CONFIG_NAME}: `threshold` {config.get('threshold')!r} differs from `gate_config.threshold` "
            f"{gate_config.threshold!r}; re-export with `safegate export --threshold` instead of editing by hand."
        )
    _check_optional(config)
    if with_files:
        check_file_records(config.get("files"))
    return config


def _check_backbone(backbone: dict[str, Any]) -> dict[str, Any]:
    missing = [k for k, (_, required) in _BACKBONE.items() if required and k not in backbone]
    if missing:
        raise BundleError(f"{CONFIG_NAME}: `backbone` lacks {missing}. {_FIX}")
    for key, (kind, _) in _BACKBONE.items():
        if key in backbone and not _is(kind, backbone[key]):
            raise _fail(CONFIG_NAME, f"backbone.{key}", backbone[key], kind)
    for key in ("hidden_size", "num_layers", "vocab_rows"):
        if backbone[key] < 1:
            raise _fail(CONFIG_NAME, f"backbone.{key}", backbone[key], "a positive integer")
    for key in ("embed_module", "head_module"):
        if not backbone[key]:
            raise _fail(CONFIG_NAME, f"backbone.{key}", backbone[key], "a module path")
    if backbone.get("vocab_rows_gated", backbone["vocab_rows"]) < backbone["vocab_rows"]:
        raise _fail(CONFIG_NAME, "backbone.vocab_rows_gated", backbone["vocab_rows_gated"], "at least `vocab_rows`")
    return backbone


def _check_gate_config(data: dict[str, Any], num_layers: int) -> GateConfig:
    for key, value in data.items():
        kind = _GATE_KINDS.get(key)
        if kind is not None and not (value is None and key in _OPTIONAL_NONE) and not _is(kind, value):
            raise _fail(CONFIG_NAME, f"gate_config.{key}", value, kind + (" or null" if key in _OPTIONAL_NONE else ""))
    try:
        gate_config = GateConfig.from_dict(data)
    except (TypeError, ValueError) as err:
        raise BundleError(f"{CONFIG_NAME}: invalid `gate_config`: {err}") from err
    if gate_config.layer != -1 and not -num_layers <= gate_config.layer < num_layers:
        raise _fail(
            CONFIG_NAME, "gate_config.layer", gate_config.layer,
            f"-1 (final norm) or a layer in [{-num_layers}, {num_layers - 1}] (`backbone.num_layers` is {num_layers})",
        )  # fmt: skip
    if gate_config.lora_target is not None:
        try:
            re.compile(gate_config.lora_target)
        except re.error as err:
            raise _fail(CONFIG_NAME, "gate_config.lora_target", gate_config.lora_target, f"a regex ({err})") from err
    return gate_config


def _check_tokens(tokens: dict[str, Any], gate_config: GateConfig) -> None:
    for key, expected in (("safe", gate_config.safe_token), ("unsafe", gate_config.unsafe_token)):
        if tokens.get(key) != expected:
            raise _fail(CONFIG_NAME, f"tokens.{key}", tokens.get(key), f"{expected!r} (`gate_config.{key}_token`)")
    ids = tokens.get("ids_at_save")
    if ids is not None and not (
        isinstance(ids, dict) and all(_is(_INT, v) and v >= 0 for v in ids.values())
    ):  # informational, but typed
        raise _fail(CONFIG_NAME, "tokens.ids_at_save", ids, "an object token -> id")


def _check_optional(config: dict[str, Any]) -> None:
    versions = config.get("versions")
    strings = isinstance(versions, dict) and all(isinstance(v, str) for v in versions.values())
    if versions is not None and not strings:
        raise _fail(CONFIG_NAME, "versions", versions, "an object library -> version string")
    _section(config, "method", required=False)
    recipe = config.get("recipe")
    if recipe is not None and not isinstance(recipe, str):
        raise _fail(CONFIG_NAME, "recipe", recipe, "a recipe name or path (string) or null")
    rows = config.get("evaluation")
    if rows is not None and not (isinstance(rows, list) and all(isinstance(r, dict) for r in rows)):
        raise _fail(CONFIG_NAME, "evaluation", rows, "a list of rows (objects) or null")


def check_file_records(files: Any) -> None:
    """`files` must hold a size and sha256 record for each safetensors file."""
    if not isinstance(files, dict):
        expected = f"an object with a size/sha256 record for each of {list(CHECKSUMMED)}"
        raise _fail(CONFIG_NAME, "files", files, expected)
    for name in CHECKSUMMED:
        record = files.get(name)
        if not (
            isinstance(record, dict)
            and _is(_INT, record.get("size"))
            and record["size"] >= 0
            and isinstance(record.get("sha256"), str)
            and _SHA256.fullmatch(record["sha256"])
        ):
            raise _fail(CONFIG_NAME, f"files.{name}", record, '{"size": <bytes>, "sha256": <64 hex digits>}')


# ------------------------------------------------------------------------------------------- adapter config
_LORA_OFF = ("use_dora", "use_rslora", "fan_in_fan_out", "lora_bias", "use_qalora")
_LORA_EMPTY = ("modules_to_save", "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern")


def check_adapter_config(data: Any, gate_config: GateConfig) -> None:
    """Raise `BundleError` unless `adapter_config.json` describes the adapter safegate writes for `gate_config`."""
    if not isinstance(data, dict):
        raise BundleError(f"{ADAPTER_CONFIG_NAME} is not a valid PEFT adapter config: not an object. {_FIX}")
    lora = gate_config.lora_r > 0
    peft_type = "LORA" if lora else "TRAINABLE_TOKENS"
    if data.get("peft_type") != peft_type:
        expected = f"{peft_type!r} (the gate config has lora_r={gate_config.lora_r})"
        raise _fail(ADAPTER_CONFIG_NAME, "peft_type", data.get("peft_type"), expected)
    target = data.get("target_modules")
    if not (isinstance(target, str) or _is("list", target)):
        raise _fail(ADAPTER_CONFIG_NAME, "target_modules", target, "a module regex or a list of module names")
    if isinstance(target, str):
        try:
            re.compile(target)
        except re.error as err:
            raise _fail(ADAPTER_CONFIG_NAME, "target_modules", target, f"a regex ({err})") from err
    if not lora:
        _check_indices(data, "token_indices", data.get("token_indices"))
        return
    for key, source in (("r", "lora_r"), ("lora_alpha", "lora_alpha")):
        value, expected = data.get(key), getattr(gate_config, source)
        if not _is(_INT, value) or value < 1 or value != expected:
            raise _fail(ADAPTER_CONFIG_NAME, key, value, f"the positive integer {expected} (`gate_config.{source}`)")
    dropout = data.get("lora_dropout", 0.0)
    if not _is(_NUMBER, dropout) or not 0.0 <= dropout < 1.0:
        raise _fail(ADAPTER_CONFIG_NAME, "lora_dropout", dropout, "a number in [0, 1)")
    if data.get("bias", "none") != "none":
        raise _fail(ADAPTER_CONFIG_NAME, "bias", data.get("bias"), "'none' (safegate trains no biases)")
    for key in _LORA_OFF:
        if data.get(key) not in (None, False):
            raise _fail(ADAPTER_CONFIG_NAME, key, data.get(key), "false (safegate's adapter does not use it)")
    for key in _LORA_EMPTY:
        if data.get(key) not in (None, [], {}):
            raise _fail(ADAPTER_CONFIG_NAME, key, data.get(key), "null or empty (safegate's adapter does not use it)")
    tokens = data.get("trainable_token_indices")
    if not isinstance(tokens, dict) or not tokens:
        raise _fail(ADAPTER_CONFIG_NAME, "trainable_token_indices", tokens, "an object module -> [safe id, unsafe id]")
    for module, ids in tokens.items():
        _check_indices(data, f"trainable_token_indices.{module}", ids)


def _check_indices(data: dict[str, Any], field: str, ids: Any) -> None:
    if not (isinstance(ids, list) and len(ids) == 2 and all(_is(_INT, i) and i >= 0 for i in ids)):
        raise _fail(ADAPTER_CONFIG_NAME, field, ids, "[safe id, unsafe id] (two non-negative integers)")


# ------------------------------------------------------------------------------------------------- tensors
def check_tensor_values(tensors: Mapping[str, torch.Tensor], file: str) -> None:
    """Every tensor must be floating point and finite (a NaN or inf would pass silently into the gate's verdict)."""
    for key, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise BundleError(f"{file}: tensor `{key}` has dtype {tensor.dtype}, expected floating point. {_FIX}")
        if not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise BundleError(
                f"{file}: tensor `{key}` holds {bad} non-finite value(s) (NaN or inf): the bundle is corrupt or was "
                f"trained into a divergence. {_FIX}"
            )


def gate_tensor_shapes(gate_config: GateConfig, hidden: int) -> dict[str, tuple[int, ...]]:
    """Shapes of the gate's state (`gate.<name>`) for `gate_config` and hidden size `hidden`, allocating nothing."""
    with torch.device("meta"):
        gate = build_gate(hidden, torch.empty(hidden), gate_config)
    return {f"gate.{k}": tuple(v.shape) for k, v in gate.state_dict().items()}


def check_gate_tensors(tensors: Mapping[str, torch.Tensor], gate_config: GateConfig, hidden: int, file: str) -> None:
    """The `gate.*` tensors must be exactly the gate `gate_config` builds: same names, same shapes."""
    try:
        expected = gate_tensor_shapes(gate_config, hidden)
    except (RuntimeError, ValueError, TypeError, OverflowError) as err:  # sizes too large even for the meta device
        raise _fail(
            CONFIG_NAME, "gate_config.attention_dim", gate_config.attention_dim, "a width the gate tensors have"
        ) from err
    found = {k: tuple(t.shape) for k, t in tensors.items() if k.startswith("gate.")}
    for key in sorted(set(found) | set(expected)):
        if key not in found and key.removeprefix("gate.") in SafetyGate.OPTIONAL_STATE:
            continue  # saved before the gate had it: loads as the identity (modeling/gate.py)
        if found.get(key) != expected.get(key):
            what = "missing" if key not in found else "unexpected" if key not in expected else f"shape {found[key]}"
            want = f"shape {expected[key]}" if key in expected else "no such tensor"
            raise BundleError(
                f"{file}: tensor `{key}` is {what}; the gate config (attention_dim={gate_config.attention_dim}, "
                f"backbone hidden_size={hidden}) needs {want}. {_FIX}"
            )
