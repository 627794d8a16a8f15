"""A merged export's checkpoint as a serving engine reads it: the head's two safety rows, and the weight files.

`safety_head_rows` reads the head's two safety rows from the safetensors without building the model.

The raw safety logits at the last prompt position are these rows times the final norm's output there (the states a
pooling pass returns), so the verdict needs no logits from the generating engine. Models whose config changes logits
after the head (soft-capping, scaling: `modeling.speculative.logit_post_processing`) are refused.

vLLM loads every top-level `*.safetensors` file of a model folder unless `model.safetensors.index.json` lists the
weight files, so the gate's `safegate_gate.safetensors` beside an unsharded model would break its loading ("no module
or parameter named 'input_inv_std'"). `save_merged` writes that index; `check_engine_loadable` refuses an export
without it (written by an older safegate) and `write_weights_index` (re-exported from `safegate.hub.merged_files`)
fixes such a folder in place.

Example:
    >>> import tempfile, safegate
    >>> from safegate.testing import tiny_model_and_tokenizer
    >>> model, tok = tiny_model_and_tokenizer("qwen2")
    >>> gated = safegate.attach(model, tok, safegate.GateConfig(attention_dim=16, lora_r=4))
    >>> tmp = tempfile.TemporaryDirectory()
    >>> folder = gated.save_merged(f"{tmp.name}/merged")
    >>> rows = safety_head_rows(folder)
    >>> head = gated.arch.root.get_output_embeddings().weight
    >>> bool(torch.allclose(rows, head[[gated.safe_token_id, gated.unsafe_token_id]].float()))
    True
    >>> check_engine_loadable(folder)  # save_merged wrote the weights index vLLM needs
    >>> tmp.cleanup()
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig

from safegate.hub.merged import read_merged_gate
from safegate.hub.merged_files import GATE_WEIGHTS_NAME, INDEX_NAME, MANIFEST_NAME
from safegate.modeling.speculative import logit_post_processing


class UnservableExport(ValueError):
    """A merged export whose verdict the serving path cannot compute exactly; the message says why and what to do."""


def safety_head_rows(path: str | os.PathLike) -> torch.Tensor:
    """`(2, hidden)` float32: the head rows of `(safe_id, unsafe_id)` of the merged export at `path`."""
    folder = Path(path)
    gate = read_merged_gate(folder)
    backbone = json.loads((folder / MANIFEST_NAME).read_text())["backbone"]
    post = logit_post_processing(AutoConfig.from_pretrained(folder))
    if post:
        raise UnservableExport(
            f"{folder}/config.json sets {post}: the model changes its logits after the head, so the safety pair is "
            "not the head rows times the final states. Serve it with transformers (`safegate.load_merged`)."
        )
    module = backbone["embed_module"] if backbone["tied"] else backbone["head_module"]
    key = ".".join(part for part in (backbone.get("gated_module", ""), module, "weight") if part)
    weights = folder / "model.safetensors"
    if (folder / INDEX_NAME).is_file():
        weight_map = json.loads((folder / INDEX_NAME).read_text())["weight_map"]
        if key not in weight_map:
            raise UnservableExport(f"{folder}/{INDEX_NAME} lists no tensor {key!r}; re-export with `save_merged`.")
        weights = folder / weight_map[key]
    with safe_open(str(weights), framework="pt") as f:
        if key not in set(f.keys()):  # a safe_open handle has no `in`
            raise UnservableExport(f"{weights} holds no tensor {key!r}; re-export with `save_merged`.")
        matrix = f.get_slice(key)
        rows = torch.stack([matrix[i : i + 1][0] for i in (gate.safe_id, gate.unsafe_id)])
    return rows.float()


def check_engine_loadable(path: str | os.PathLike) -> None:
    """Raise `UnservableExport` when an engine that globs `*.safetensors` (vLLM) would load the gate's weights as
    model weights: an unsharded export without `model.safetensors.index.json`."""
    folder = Path(path)
    if (folder / GATE_WEIGHTS_NAME).is_file() and not (folder / INDEX_NAME).is_file():
        raise UnservableExport(
            f"{folder} has {GATE_WEIGHTS_NAME} beside its weights but no {INDEX_NAME}: vLLM would load the gate's "
            f"tensors as model weights and fail. Run `safegate.serving.write_weights_index({str(folder)!r})` once."
        )
