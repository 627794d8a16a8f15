"""Turn validated records into token ids (`build_inputs`, `encode_record`) and right-padded batches (`CASACollator`).

Layout of one CASA training sequence (methods `casa` and `token_only`):

    [prompt ids ... assistant header] [safety id] [response ids ... end of turn]

The gate reads the prompt positions only; the safety id is the target of the 2-way gated pair at the last prompt
position; the response tokens after it are the targets of the token cross-entropy. Method `ssft` drops the safety
id: `[prompt] [response]`. Batches are right-padded so positions stay natural (`0..P-1` for the prompt, exactly
what left-padded inference computes from its attention mask).

Multimodal records (`images` / `audios`) go through the model's processor (`processor_input_builder`): it expands
the placeholders and returns extra model inputs (`pixel_values`, `input_features`, ...), which the collator passes
through to the model.

Example:
    >>> from safegate.testing import tiny_tokenizer
    >>> tok = tiny_tokenizer()
    >>> ex = encode_record(tok, {"prompt": "Hi", "response": "Hello", "label": "safe"}, safe_id=7, unsafe_id=8)
    >>> ex["input_ids"][ex["prompt_length"]], ex["label"]
    (7, 0)
    >>> batch = CASACollator(pad_token_id=tok.pad_token_id)([ex])
    >>> sorted(batch)
    ['attention_mask', 'class_labels', 'gate_mask', 'input_ids', 'labels', 'prompt_mask', 'safety_index']
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from safegate.data.records import assistant_continuation, format_prompt, label_id, prompt_messages
from safegate.modeling.tokens import text_tokenizer

METHODS = ("casa", "ssft", "token_only")
BATCH_KEYS = ("input_ids", "attention_mask", "labels", "prompt_mask", "class_labels", "safety_index", "gate_mask")


def build_inputs(processor: Any, record: Mapping[str, Any], safety_prompt: str | None = None) -> dict[str, Any]:
    """Token ids of one record's prompt and assistant continuation, plus extra model inputs.

    Text records are tokenized here. Records with `images` / `audios` go to `processor_input_builder` (a
    generic path through a Hugging Face multimodal processor).

    Returns:
        `dict`: `prompt_ids` (list[int]), `response_ids` (list[int], empty without a response) and
        `model_inputs` (dict of tensors for the model's forward, empty for text).
    """
    if record.get("images") or record.get("audios"):
        return processor_input_builder(processor, record, safety_prompt)
    tok = text_tokenizer(processor)
    templated = bool(getattr(tok, "chat_template", None) or getattr(processor, "chat_template", None))
    prompt = format_prompt(processor, record, safety_prompt)
    prompt_ids = list(tok(prompt, add_special_tokens=not templated)["input_ids"])
    response_ids: list[int] = []
    if record.get("response") is not None:
        continuation = assistant_continuation(processor, record, safety_prompt)
        response_ids = list(tok(continuation, add_special_tokens=False)["input_ids"])
    return {"prompt_ids": prompt_ids, "response_ids": response_ids, "model_inputs": {}}


def processor_input_builder(
    processor: Any, record: Mapping[str, Any], safety_prompt: str | None = None
) -> dict[str, Any]:
    """Generic multimodal path: chat template with media parts, then `processor(text=, images=, audio=)`.

    Works with processors that follow the transformers convention (Qwen2.5-Omni, Qwen2-VL, LLaVA). Returns
    `{"prompt_ids", "response_ids", "model_inputs"}` like `build_inputs` (placeholders expanded in `prompt_ids`;
    `model_inputs` tensors as the processor returns them).
    """
    if not callable(processor) or text_tokenizer(processor) is processor:
        raise ValueError(
            "a record has images/audios but the model came with a plain tokenizer; load the model's processor "
            "(AutoProcessor) to train on media."
        )
    images = [_load_image(p) for p in record.get("images", [])]
    audios = [_load_audio(p) for p in record.get("audios", [])]
    messages = prompt_messages(record, safety_prompt)
    parts: list[dict[str, Any]] = [{"type": "image"} for _ in images] + [{"type": "audio"} for _ in audios]
    last = messages[-1]
    content = last["content"] if isinstance(last["content"], list) else [{"type": "text", "text": last["content"]}]
    messages[-1] = {**last, "content": parts + content}
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt = prompt[0] if isinstance(prompt, list) else prompt
    kwargs: dict[str, Any] = {"text": [prompt], "return_tensors": "pt"}
    if images:
        kwargs["images"] = images
    if audios:
        kwargs["audio"] = audios
    encoded = dict(processor(**kwargs))
    prompt_ids = encoded.pop("input_ids")[0].tolist()
    encoded.pop("attention_mask", None)
    tok = text_tokenizer(processor)
    response_ids: list[int] = []
    if record.get("response") is not None:
        continuation = assistant_continuation(processor, record, safety_prompt)
        response_ids = list(tok(continuation, add_special_tokens=False)["input_ids"])
    return {"prompt_ids": prompt_ids, "response_ids": response_ids, "model_inputs": encoded}


def encode_record(
    processor: Any,
    record: Mapping[str, Any],
    *,
    safe_id: int,
    unsafe_id: int,
    method: str = "casa",
    safety_prompt: str | None = None,
    max_length: int | None = None,
) -> dict[str, Any] | None:
    """Token ids and bookkeeping of one training example, or `None` when its prompt alone exceeds `max_length`.

    The response is truncated to fit `max_length`; the prompt never is (the gate must read all of it).
    """
    check_method(method)
    built = build_inputs(processor, record, safety_prompt)
    prompt_ids, response_ids = built["prompt_ids"], built["response_ids"]
    head = list(prompt_ids)
    if method != "ssft":
        head.append(unsafe_id if record["label"] == "unsafe" else safe_id)
    if max_length is not None:
        if len(head) + (1 if response_ids else 0) > max_length:
            return None
        response_ids = response_ids[: max_length - len(head)]
    return {
        "input_ids": head + list(response_ids),
        "prompt_length": len(prompt_ids),
        "response_start": len(head),
        "label": label_id(record["label"]),
        "gate": bool(record.get("gate", True)),
        "model_inputs": built["model_inputs"],
    }


class CASACollator:
    """Right-pad encoded examples into one batch: ids, masks, response targets, classes, extra model inputs.

    Args:
        pad_token_id (`int`): Id used for padding (masked everywhere).
        merge_model_inputs (`Callable | None`): How to merge per-example extra model inputs (default:
            concatenate tensors along their first dimension).
    """

    def __init__(
        self,
        pad_token_id: int,
        merge_model_inputs: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None,
    ) -> None:
        self.pad_token_id = int(pad_token_id)
        self.merge_model_inputs = merge_model_inputs or concat_model_inputs

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        batch = len(features)
        input_ids = torch.full((batch, width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((batch, width), dtype=torch.long)
        labels = torch.full((batch, width), -100, dtype=torch.long)
        prompt_mask = torch.zeros((batch, width), dtype=torch.long)
        for i, f in enumerate(features):
            ids = torch.tensor(f["input_ids"], dtype=torch.long)
            n = ids.shape[0]
            input_ids[i, :n] = ids
            attention_mask[i, :n] = 1
            prompt_mask[i, : f["prompt_length"]] = 1
            start = f["response_start"]
            labels[i, start:n] = ids[start:]
        out = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "prompt_mask": prompt_mask,
            "class_labels": torch.tensor([f["label"] for f in features], dtype=torch.long),
            "safety_index": torch.tensor([f["prompt_length"] - 1 for f in features], dtype=torch.long),
            # 0 = the record conditions the answer on its token but does not train the gate (`"gate": false`)
            "gate_mask": torch.tensor([float(f.get("gate", True)) for f in features]),
        }
        extras = _pad_token_types([f.get("model_inputs") or {} for f in features], width)
        if any(extras):
            out.update(self.merge_model_inputs(extras))
        return out


TOKEN_TYPE_INPUTS = ("mm_token_type_ids", "token_type_ids")


def _pad_token_types(extras: list[dict[str, Any]], width: int) -> list[dict[str, Any]]:
    """Give every row per-token type ids of the batch width: right-padded with 0 (= text), zeros where absent."""
    out = [dict(e) for e in extras]
    for key in TOKEN_TYPE_INPUTS:
        if not any(key in e for e in out):
            continue
        for e in out:
            value = e.get(key)
            if value is None:
                e[key] = torch.zeros((1, width), dtype=torch.long)
            elif value.shape[-1] < width:
                e[key] = torch.nn.functional.pad(value.reshape(1, -1), (0, width - value.shape[-1]), value=0)
    return out


def concat_model_inputs(extras: list[dict[str, Any]]) -> dict[str, Any]:
    """Concatenate each extra model input over the examples that have it (first dimension)."""
    merged: dict[str, Any] = {}
    for key in dict.fromkeys(k for e in extras for k in e):
        values = [e[key] for e in extras if key in e]
        if all(isinstance(v, torch.Tensor) for v in values):
            try:
                merged[key] = torch.cat(values, dim=0)
            except RuntimeError as err:
                raise ValueError(
                    f"cannot batch the model input {key!r} ({[tuple(v.shape) for v in values]}): {err}. "
                    "Pass `merge_model_inputs=` to CASACollator for this processor."
                ) from err
        else:
            merged[key] = values
    return merged


def check_method(method: str) -> str:
    """Return `method` if it is a known training method; raise `ValueError` naming the choices otherwise."""
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {METHODS}, got {method!r}.")
    return method


def _load_image(path: str) -> Any:
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def _load_audio(path: str) -> Any:
    try:
        import soundfile

        audio, _ = soundfile.read(path, dtype="float32", always_2d=False)
    except ImportError:
        import wave

        import numpy as np

        with wave.open(path, "rb") as handle:
            frames = handle.readframes(handle.getnframes())
            width, channels = handle.getsampwidth(), handle.getnchannels()
        if width != 2:
            raise ValueError(f"audio file {path!r}: only 16-bit PCM WAV is readable without `soundfile`.") from None
        audio = np.frombuffer(frames, dtype="<i2").astype("float32") / 32768.0
        if channels > 1:
            audio = audio.reshape(-1, channels).mean(1)
    return audio.mean(1) if getattr(audio, "ndim", 1) > 1 else audio
