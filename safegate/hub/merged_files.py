"""The files of a merged export: names, the merged weights, the manifest's schema, the target check, the model card.

A merged export (`safegate.hub.merged`, format: `docs/serving.md`, "Merged export") is a plain Hugging Face
checkpoint plus two safegate files. This module builds and checks what goes into them; nothing here writes a folder.

Example:
    >>> import safegate
    >>> from safegate.testing import tiny_model_and_tokenizer
    >>> model, tok = tiny_model_and_tokenizer("llama", tie_word_embeddings=False)
    >>> gated = safegate.attach(model, tok, safegate.GateConfig(attention_dim=16, lora_r=4))
    >>> state = merged_state_dict(gated)
    >>> any("lora" in k or "token_adapter" in k for k in state), state["lm_head.weight"].shape[0] == len(tok)
    (False, True)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import ModelCard, ModelCardData
from peft.tuners.lora import LoraLayer
from safetensors import safe_open

from safegate.hub.files import PAPER_URL, BundleError
from safegate.hub.schema import gate_tensor_shapes
from safegate.modeling.config import GateConfig
from safegate.modeling.model import SafeGateModel

MERGED_FORMAT = "safegate-merged"
MERGED_SCHEMA_VERSION = 1
MANIFEST_NAME = "safegate_merged.json"
GATE_WEIGHTS_NAME = "safegate_gate.safetensors"
INDEX_NAME = "model.safetensors.index.json"  # lists the model's weight files, so engines skip the gate's
CARD_NAME = "README.md"
_FIX = "Re-export it with `gated.save_merged(DIR)` (or `safegate export --merged DIR`) instead of editing it by hand."
_PEFT_SEGMENTS = re.compile(r"\.(?:token_adapter|base_layer)(?=\.)")
_ADAPTER_KEY = re.compile(r"\.lora_|trainable_tokens_")


# ------------------------------------------------------------------------------------------------ weights
@torch.no_grad()
def merged_state_dict(gated: SafeGateModel) -> dict[str, torch.Tensor]:
    """The original model's state dict under its plain names, LoRA merged in and the two trained rows in place.

    Computed beside the live weights, never in them: each LoRA layer's weight is `W + ΔW` with PEFT's own
    `get_delta_weight` (the same in-place add `merge_adapter` does, so the bits equal PEFT's merge, bf16 included),
    each token layer's is PEFT's `get_merged_weights`; `gated` is not modified. A tied head shares the embedding's
    tensor, so it gets the rows with it. Only the replaced matrices are new memory.
    """
    gated._check_attached()
    replaced: dict[int, torch.Tensor] = {}
    for module in gated.peft_model.modules():
        if isinstance(module, LoraLayer) and not module.merged and "default" in module.lora_A:
            weight = module.get_base_layer().weight
            merged = weight.detach().clone()
            merged += module.get_delta_weight("default")
            replaced[id(weight)] = merged
    for layer in gated.token_layers().values():
        if not layer.merged:  # a merged layer's base weight already holds the rows
            replaced[id(layer.base_layer.weight)] = layer.get_merged_weights(["default"]).detach()
    state: dict[str, torch.Tensor] = {}
    for key, tensor in gated.original_model.state_dict(keep_vars=True).items():
        if _ADAPTER_KEY.search(key):
            continue
        plain = _PEFT_SEGMENTS.sub("", key)
        if plain in state:
            raise RuntimeError(f"two weights map to `{plain}` when PEFT's wrappers are removed; cannot merge.")
        state[plain] = replaced.get(id(tensor), tensor).detach()
    return state


def tapped_layer(gate_config: GateConfig, num_layers: int) -> int:
    """The decoder layer index (0-based) whose output the gate reads, or `-1` for the final norm's output."""
    return -1 if gate_config.layer == -1 else gate_config.layer % num_layers


def hidden_states_index(layer: int, num_layers: int) -> int | None:
    """Index into transformers' `output_hidden_states=True` tuple that holds the tapped states, or `None`.

    That tuple holds the embeddings, then each decoder layer's output, except that its last entry is the final
    norm's output: layer `k < num_layers - 1` is entry `k + 1`, the final norm (`-1`) is entry `num_layers`, and
    the last decoder layer's own (un-normed) output is not in it.

    Example:
        >>> hidden_states_index(-1, 30), hidden_states_index(5, 30), hidden_states_index(29, 30)
        (30, 6, None)
    """
    if layer == -1:
        return num_layers
    return layer + 1 if layer < num_layers - 1 else None


# ------------------------------------------------------------------------------------------------ checks
def check_merged_target(target: Path) -> None:
    """Raise `BundleError` if saving a merged export to `target` would replace a file or a folder that is not one."""
    if target.exists() and not target.is_dir():
        raise BundleError(f"cannot save a merged export to {target}: it is a file. Choose a folder path.")
    if target.is_dir() and any(target.iterdir()) and not (target / MANIFEST_NAME).is_file():
        raise BundleError(
            f"refusing to replace {target}: the folder is not empty and is not a safegate merged export (no "
            f"{MANIFEST_NAME}). Choose a new or empty folder."
        )


def sha256(path: Path) -> str:
    """Hex sha256 of the file at `path`, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fail(field: str, value: Any, expected: str) -> BundleError:
    shown = "missing (or null)" if value is None else repr(value)[:80]
    return BundleError(f"{MANIFEST_NAME}: `{field}` is {shown}, expected {expected}. {_FIX}")


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_manifest(manifest: Any) -> dict[str, Any]:
    """Return `manifest` (the parsed `safegate_merged.json`) if every field the gate needs has its type and range."""
    if not isinstance(manifest, dict) or manifest.get("format") != MERGED_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise BundleError(f"{MANIFEST_NAME} is not a safegate merged export (`format` is {found!r}, not "
                          f"{MERGED_FORMAT!r}). {_FIX}")  # fmt: skip
    if manifest.get("schema_version") != MERGED_SCHEMA_VERSION or isinstance(manifest.get("schema_version"), bool):
        raise _fail("schema_version", manifest.get("schema_version"), f"{MERGED_SCHEMA_VERSION} (upgrade safegate)")
    for section in ("backbone", "tokens", "gate", "gate_config", "files"):
        if not isinstance(manifest.get(section), dict):
            raise _fail(section, manifest.get(section), "an object")
    backbone, tokens, gate = manifest["backbone"], manifest["tokens"], manifest["gate"]
    for key in ("hidden_size", "num_layers", "vocab_rows"):
        if not _int(backbone.get(key)) or backbone[key] < 1:
            raise _fail(f"backbone.{key}", backbone.get(key), "a positive integer")
    if not isinstance(backbone.get("tied"), bool):
        raise _fail("backbone.tied", backbone.get("tied"), "true or false")
    try:
        config = GateConfig.from_dict(manifest["gate_config"])
    except (TypeError, ValueError) as err:
        raise BundleError(f"{MANIFEST_NAME}: invalid `gate_config`: {err} {_FIX}") from err
    if config.lora_r != 0:
        raise _fail("gate_config.lora_r", config.lora_r, "0 (LoRA is merged into the weights)")
    for key, token in (("safe", config.safe_token), ("unsafe", config.unsafe_token)):
        if tokens.get(key) != token:
            raise _fail(f"tokens.{key}", tokens.get(key), f"{token!r} (`gate_config.{key}_token`)")
        tid = tokens.get(f"{key}_id")
        if not _int(tid) or not 0 <= tid < backbone["vocab_rows"]:
            raise _fail(f"tokens.{key}_id", tid, f"an id below backbone.vocab_rows={backbone['vocab_rows']}")
    if tokens["safe_id"] == tokens["unsafe_id"]:
        raise _fail("tokens.unsafe_id", tokens["unsafe_id"], "an id other than tokens.safe_id")
    layer, layers = gate.get("tapped_layer"), backbone["num_layers"]
    if not _int(layer) or not (layer == -1 or 0 <= layer < layers) or layer != tapped_layer(config, layers):
        raise _fail("gate.tapped_layer", layer, f"-1 (final norm) or the layer of gate_config.layer in [0, {layers})")
    threshold = manifest.get("threshold")
    if threshold != config.threshold or (threshold is not None and not math.isfinite(threshold)):
        raise _fail("threshold", threshold, f"{config.threshold!r} (`gate_config.threshold`)")
    for name, record in manifest["files"].items():
        if not isinstance(name, str) or Path(name).is_absolute() or ".." in Path(name).parts:
            raise _fail("files", name, "relative file names inside the export")
        if not isinstance(record, dict) or not _int(record.get("size")) or record["size"] < 0:
            raise _fail(f"files.{name}", record, '{"size": <bytes>} (and "sha256" for the gate file)')
    if not isinstance(manifest["files"].get(GATE_WEIGHTS_NAME, {}).get("sha256"), str):
        raise _fail(f"files.{GATE_WEIGHTS_NAME}.sha256", None, "the gate file's sha256 (64 hex digits)")
    return manifest


def check_files(folder: Path, files: dict[str, dict[str, Any]]) -> None:
    """Raise `BundleError` unless every file the manifest lists is there with its size (the gate file: its sha256)."""
    for name, record in files.items():
        path = folder / name
        if not path.is_file():
            raise BundleError(f"{folder} is not a complete merged export: `{name}` is missing. {_FIX}")
        if path.stat().st_size != record["size"]:
            raise BundleError(
                f"`{name}` in {folder} is {path.stat().st_size} bytes but {MANIFEST_NAME} records {record['size']}:"
                f" the file is truncated or was replaced. {_FIX}"
            )
        if "sha256" in record and sha256(path) != record["sha256"]:
            raise BundleError(f"`{name}` in {folder} does not match its sha256 in {MANIFEST_NAME}: it is corrupt "
                              f"or was edited. {_FIX}")  # fmt: skip


def check_gate_state(state: dict[str, torch.Tensor], config: GateConfig, hidden: int) -> dict[str, torch.Tensor]:
    """The gate's state (keys without a prefix) if it is exactly the gate `config` builds, finite and floating."""
    expected = {k.removeprefix("gate."): v for k, v in gate_tensor_shapes(config, hidden).items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    for key in sorted(set(found) | set(expected)):
        if found.get(key) != expected.get(key):
            what = "missing" if key not in found else "unexpected" if key not in expected else f"shape {found[key]}"
            want = f"shape {expected[key]}" if key in expected else "no such tensor"
            raise BundleError(
                f"{GATE_WEIGHTS_NAME}: tensor `{key}` is {what}; the gate config (attention_dim="
                f"{config.attention_dim}, hidden_size={hidden}) needs {want}. {_FIX}"
            )
    for key, tensor in state.items():
        if not tensor.is_floating_point() or not bool(torch.isfinite(tensor).all()):
            raise BundleError(f"{GATE_WEIGHTS_NAME}: tensor `{key}` ({tensor.dtype}) is not all finite floating-point "
                              f"values (NaN or inf): the export is corrupt or the gate diverged. {_FIX}")  # fmt: skip
    return state


# ------------------------------------------------------------------------------------------------ card
def merged_card(manifest: dict[str, Any]) -> ModelCard:
    """The README.md of a merged export: metadata for the Hub, what the checkpoint is and how to use it."""
    b, t, g = manifest["backbone"], manifest["tokens"], manifest["gate_config"]
    data = ModelCardData(library_name="transformers", pipeline_tag="text-generation",
                         tags=["safegate", "safety", "casa", "merged"])  # fmt: skip
    base = b.get("name_or_path") or ""
    if re.fullmatch(r"[\w.-]+/[\w.-]+", base) and not os.path.exists(base):
        data.base_model = base
    lora = manifest.get("merged_lora") or {}
    layer = manifest["gate"]["tapped_layer"]
    decision = "argmax of the gated pair" if manifest["threshold"] is None else f"p(unsafe) >= {manifest['threshold']}"
    body = f"""# {base or b.get("model_type", "model")} with a merged safegate CASA gate

A plain Hugging Face checkpoint: the safegate LoRA (r={lora.get("r", 0)}) is merged into the weights and the two
safety tokens `{t["safe"]}` (id {t["safe_id"]}) and `{t["unsafe"]}` (id {t["unsafe_id"]}) are in the tokenizer,
the input embedding and the head ({"tied" if b["tied"] else "untied"}). The CASA safety gate
([arXiv 2604.00310]({PAPER_URL})) is in `{GATE_WEIGHTS_NAME}` (config: `{MANIFEST_NAME}`).

```python
import safegate
gated, tok = safegate.load_merged("<this folder>")        # the gate attached, no LoRA added
out = gated.generate(**inputs, return_dict_in_generate=True)   # out.safety, out.safety_scores
```

Any engine loads the model alone (`AutoModelForCausalLM.from_pretrained`, vLLM); the verdict then comes from
`safegate.hub.merged.read_merged_gate` and `merged_verdict` on the prompt's states of the tapped layer
({"the final norm" if layer == -1 else f"decoder layer {layer}"}) and the head's logits of the two tokens at the
last prompt position. See safegate's `docs/serving.md`, "Merged export".

| | |
|---|---|
| gate | attention_dim={g["attention_dim"]}, aggregation={g["aggregation"]}, scaling={g["scaling"]} |
| decision | {decision} |
| dtype | {b.get("dtype", "(not recorded)")} |
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def write_weights_index(path: str | os.PathLike) -> Path:
    """Write `model.safetensors.index.json` listing the model's weight files (not the gate's); return its path.

    Engines that load every top-level `*.safetensors` of a folder unless an index lists the weight files (vLLM)
    would otherwise read the gate's tensors as model weights; transformers reads the folder either way.
    """
    folder = Path(path)
    weight_map, total = {}, 0
    for file in sorted(p for p in folder.glob("*.safetensors") if p.name != GATE_WEIGHTS_NAME):
        with safe_open(str(file), framework="pt") as f:
            weight_map.update(dict.fromkeys(list(f.keys()), file.name))
        total += file.stat().st_size
    if not weight_map:
        raise BundleError(f"{folder} holds no model weights (*.safetensors besides {GATE_WEIGHTS_NAME}).")
    index = folder / INDEX_NAME
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1) + "\n")
    return index
