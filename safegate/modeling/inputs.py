"""The inputs of a gated `generate` call: checks, the safety token's share of the length budget, and row reshaping.

The safety token is one more position than the caller asked for: `generate` either counts it as a new token
(`extend_length_budget`) or, where it is fed as part of the input, as part of the total length
(`count_safety_token_in_length`). With an assistant prefix (a prefill attack), the gate decides on each row without
it (`strip_prefix`) and the answer is generated from `prompt, safety token, prefix` (`insert_tokens`). Per-token
inputs that travel with `input_ids` (e.g. `token_type_ids`) are reshaped alongside (`per_token_inputs`).

Example:
    >>> import torch
    >>> ids, mask = torch.tensor([[0, 5, 6, 7], [4, 5, 6, 7]]), torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    >>> short, short_mask, _ = strip_prefix(ids, mask, [1, 2], {}, pad_id=0)
    >>> short.tolist(), short_mask.tolist()
    ([[0, 5, 6], [0, 4, 5]], [[0, 1, 1], [0, 1, 1]])
    >>> new, new_mask, _ = insert_tokens(ids, mask, [1, 0], [9, 8], {}, keep=[True, True], pad_id=0)
    >>> new.tolist()
    [[0, 5, 6, 9, 7], [4, 5, 6, 7, 8]]
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig

from safegate.modeling.arch import MULTIMODAL_INPUTS, ArchSpec, check_required_inputs
from safegate.modeling.kv_cache import CACHE_KWARGS
from safegate.modeling.prefix import inserted_token_value, left_pad

#: Generation arguments that make no sense for the one decided step `classify` runs.
SINGLE_STEP_DROPS = (
    "max_new_tokens", "min_new_tokens", "max_length", "min_length", "do_sample", "streamer", "num_return_sequences",
    "logits_processor",
)  # fmt: skip
#: Generation arguments the gate refuses, with the reason.
UNSUPPORTED = {
    "num_beams": "beam search is not supported with a safety gate; use greedy decoding or sampling",
    "assistant_model": "assisted decoding is not supported with a safety gate",
    "prompt_lookup_num_tokens": "prompt-lookup decoding is not supported with a safety gate",
    "prefill_chunk_size": "chunked prefill is not supported: the gate must see the whole prompt at once",
    **dict.fromkeys(CACHE_KWARGS, "a user-supplied cache is not supported: the gate must see the whole prompt"),
}


def normalise_generate_kwargs(
    kwargs: dict[str, Any], kwarg_prefix: str | None, default_config: GenerationConfig
) -> dict[str, Any]:
    """A copy of `kwargs` with the architecture's keyword prefix removed; raises on what the gate cannot run."""
    if kwarg_prefix:
        kwargs = {(k[len(kwarg_prefix) :] if k.startswith(kwarg_prefix) else k): v for k, v in kwargs.items()}
    gen_config = kwargs.get("generation_config") or default_config
    for key, why in UNSUPPORTED.items():
        value = kwargs.get(key, getattr(gen_config, key, None))
        if value is not None and not (key == "num_beams" and value == 1):
            raise ValueError(f"`{key}={value!r}`: {why}.")
    if kwargs.get("cache_implementation") == "paged":
        raise ValueError("`cache_implementation='paged'` (continuous batching) is not supported by the gate.")
    return dict(kwargs)


def single_step_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """`kwargs` for one greedy step (the safety step alone): budgets, sampling and streaming removed."""
    return {k: v for k, v in kwargs.items() if k not in SINGLE_STEP_DROPS} | {"max_new_tokens": 1, "do_sample": False}


def check_prompt(
    input_ids: Any,
    attention_mask: Any,
    kwargs: dict[str, Any],
    spec: ArchSpec,
    device: torch.device,
    safety_ids: tuple[int, int],
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """`input_ids` and `attention_mask` as 2-D tensors on `device`; raises on safety ids or right padding."""
    if input_ids is None and kwargs.get("inputs_embeds") is None:
        raise ValueError("pass `input_ids` (or `inputs_embeds`), e.g. `gated.generate(**tokenizer(text, ...))`.")
    check_required_inputs(spec, kwargs)
    if input_ids is not None:
        input_ids = torch.as_tensor(input_ids, device=device)
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        if bool(torch.isin(input_ids, torch.tensor(safety_ids, device=input_ids.device)).any()):
            raise ValueError(
                "the prompt's `input_ids` already contain a safety token id "
                f"({safety_ids[0]} or {safety_ids[1]}): this is an injection attempt and is refused. "
                "Text is never tokenized to these ids; only hand-built ids can hold them."
            )
    if attention_mask is not None:
        attention_mask = torch.as_tensor(attention_mask, device=device)
        if attention_mask.dim() == 1:
            attention_mask = attention_mask.unsqueeze(0)
        if bool((attention_mask[:, -1] == 0).any()):
            raise ValueError(
                "`attention_mask` shows right padding: the gate would read a pad position. "
                "Pad on the left (`tokenizer.padding_side = 'left'`)."
            )
    return input_ids, attention_mask


def extend_length_budget(kwargs: dict[str, Any], default_config: GenerationConfig) -> dict[str, Any]:
    """The safety token is one extra new token: `kwargs` with budgets grown by one, so the answer's is unchanged."""
    gen_config = kwargs.get("generation_config") or default_config
    kwargs = dict(kwargs)
    if kwargs.get("max_new_tokens") is not None:
        kwargs["max_new_tokens"] += 1
    elif kwargs.get("max_length") is not None:
        kwargs["max_length"] += 1
    elif gen_config.max_new_tokens is not None:
        kwargs["max_new_tokens"] = gen_config.max_new_tokens + 1
    else:
        kwargs["max_length"] = gen_config.max_length + 1
    for key in ("min_new_tokens", "min_length"):
        value = kwargs.get(key, getattr(gen_config, key, None))
        if value:
            kwargs[key] = value + 1
    return kwargs


def count_safety_token_in_length(kwargs: dict[str, Any], default_config: GenerationConfig) -> dict[str, Any]:
    """The safety token is part of the input: total-length budgets (`max_length`, `min_length`) grow by one."""
    gen_config = kwargs.get("generation_config") or default_config
    kwargs = dict(kwargs)
    if kwargs.get("max_new_tokens") is None and gen_config.max_new_tokens is None:
        kwargs["max_length"] = (kwargs.get("max_length") or gen_config.max_length) + 1
    if kwargs.get("min_new_tokens") is None and not gen_config.min_new_tokens:
        value = kwargs.get("min_length", gen_config.min_length)
        if value:
            kwargs["min_length"] = value + 1
    return kwargs


def per_token_inputs(input_ids: torch.Tensor, kwargs: dict[str, Any]) -> list[str]:
    """Keys of `kwargs` holding one value per input position (shaped like `input_ids`), multimodal inputs aside."""
    return [
        k
        for k, v in kwargs.items()
        if k not in MULTIMODAL_INPUTS and isinstance(v, torch.Tensor) and v.shape[:2] == input_ids.shape
    ]


def strip_prefix(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, lengths: list[int], kwargs: dict[str, Any], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Each row without its last `lengths[i]` positions (the assistant prefix), left-padded again."""
    out_kwargs = dict(kwargs)

    def cut(t: torch.Tensor, value: int) -> torch.Tensor:
        return left_pad([row[: row.shape[0] - k] for row, k in zip(t, lengths)], value)

    for key in per_token_inputs(input_ids, kwargs):
        out_kwargs[key] = cut(kwargs[key], 0)
    return cut(input_ids, pad_id), cut(attention_mask, 0), out_kwargs


def insert_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    lengths: list[int],
    tokens: list[int | None],
    kwargs: dict[str, Any],
    keep: list[bool],
    pad_id: int,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Per row: `prompt, token, prefix` (or `prompt, token` where `keep` is False), left-padded.

    The prefix is the last `lengths[i]` positions of row i; per-token inputs get the inserted token's own value
    (`prefix.inserted_token_value`). A row whose token is `None` stays as it is (prompt and prefix, no token).
    """
    out_kwargs = dict(kwargs)

    def insert(t: torch.Tensor, values: list[int | None] | None, value_pad: int, key: str = "") -> torch.Tensor:
        """`values=None`: the per-token input `key`'s own value for an inserted token (`inserted_token_value`)."""
        rows = []
        for i, (row, k, kept) in enumerate(zip(t, lengths, keep)):
            if tokens[i] is None:
                rows.append(row)
                continue
            cut = row.shape[0] - k
            if values is None:
                new, shift = inserted_token_value(key, row[max(cut - 1, 0) : cut])
                tail = row[cut:] + shift
            else:
                new, tail = row.new_tensor([values[i]]), row[cut:]
            rows.append(torch.cat([row[:cut], new, tail if kept else row[:0]]))
        return left_pad(rows, value_pad)

    for key in per_token_inputs(input_ids, kwargs):
        out_kwargs[key] = insert(kwargs[key], None, 0, key)
    return insert(input_ids, tokens, pad_id), insert(attention_mask, [1] * len(tokens), 0), out_kwargs


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
    ids = torch.as_tensor(input_ids, device=next(embed.parameters()).device)
    ids = ids.unsqueeze(0) if ids.dim() == 1 else ids
    if tuple(embeds.shape[:2]) != tuple(ids.shape):
        raise ValueError(
            f"`inputs_embeds` has {tuple(embeds.shape[:2])} (batch, positions), `input_ids` {tuple(ids.shape)}: "
            "with both, `input_ids` must be the ids of those embeddings (they start the returned sequences). "
            "Pass only `inputs_embeds`, or ids that match them."
        )
    with torch.no_grad():
        same = torch.equal(embed(ids).to(embeds.device, embeds.dtype), embeds)
    if same:
        del kwargs["inputs_embeds"]
    return input_ids
