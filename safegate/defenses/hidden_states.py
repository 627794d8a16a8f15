"""Hidden states of a frozen model for prompt records: while it decodes (probe fitting) or at the prompt's end.

`prompt_inputs` builds left-padded model inputs from `{"prompt" | "messages", "images"?, "audios"?}` records;
`collect_decoding_states` greedily decodes them and keeps, per layer, the state of every generated token;
`last_prompt_states` reads one layer at the last prompt position. `safegate.defenses.probe_fit` fits SafeSteer's
probe and alignment vector on them.

Example:
    >>> from safegate.testing import tiny_model_and_tokenizer
    >>> model, tok = tiny_model_and_tokenizer("qwen2")
    >>> states, lengths = collect_decoding_states(model, tok, [{"prompt": "Hi"}], layers=[0], max_new_tokens=3)
    >>> len(states[0]), lengths[0] <= 3, states[0][0].shape[0] == lengths[0]
    (1, True, True)
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from safegate.defenses.decoding import eos_ids
from safegate.modeling.arch import resolve
from safegate.modeling.tokens import padding_id, text_tokenizer


def open_image(value: Any) -> Any:
    """A PIL image from a path (RGB), or `value` as it is."""
    if isinstance(value, (str, os.PathLike)):
        from PIL import Image

        return Image.open(value).convert("RGB")
    return value


def prompt_inputs(
    model: Any, processor: Any, records: Sequence[Mapping[str, Any]], system_prompt: str | None = None
) -> dict[str, Any]:
    """Left-padded model inputs for prompt records (`prompt` or `messages`, optional `images` / `audios`)."""
    from safegate.data.records import format_prompt

    if any(r.get("images") or r.get("audios") for r in records):
        from safegate.data.multimodal import MultimodalInputBuilder

        prompts = [r.get("prompt") or r["messages"][-1]["content"] for r in records]
        images = [[open_image(i) for i in r["images"]] if r.get("images") else None for r in records]
        audios = [list(r["audios"]) if r.get("audios") else None for r in records]
        return MultimodalInputBuilder(model, processor).encode(prompts, images, audios, system=system_prompt)
    tok = text_tokenizer(processor)
    texts = [format_prompt(processor, dict(r), system_prompt) for r in records]
    return dict(tok(texts, return_tensors="pt", padding=True, add_special_tokens=False))


def chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    """Consecutive slices of `items` of at most `size` elements."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


class LayerTaps:
    """Forward hooks keeping, per layer, the outputs of decoding-step forwards (every call after the first)."""

    def __init__(self, modules: dict[int, nn.Module]) -> None:
        self.modules = modules
        self.states: dict[int, list[torch.Tensor]] = {layer: [] for layer in modules}
        self.calls: dict[int, int] = dict.fromkeys(modules, 0)
        self.handles: list[Any] = []

    def __enter__(self) -> LayerTaps:
        for layer, module in self.modules.items():

            def hook(mod: nn.Module, args: Any, output: Any, layer: int = layer) -> None:
                self.calls[layer] += 1
                if self.calls[layer] > 1:
                    h = output[0] if isinstance(output, (tuple, list)) else output
                    self.states[layer].append(h[:, -1].detach().float().cpu())

            self.handles.append(module.register_forward_hook(hook))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()


@torch.no_grad()
def collect_decoding_states(
    model: Any,
    processor: Any,
    records: Sequence[Mapping[str, Any]],
    layers: Sequence[int],
    max_new_tokens: int = 32,
    batch_size: int = 8,
    system_prompt: str | None = None,
) -> tuple[dict[int, list[torch.Tensor]], list[int]]:
    """Greedy-decode each record and keep, per layer, the hidden state of every generated token (up to EOS).

    Returns `({layer: [(n_i, d) per record]}, lengths)`; state j of a record is that of its j-th generated token.
    """
    arch = resolve(model)
    tok = text_tokenizer(processor)
    modules = {layer: arch.tap_module(layer) for layer in layers}
    stops = set(eos_ids(arch.root.generation_config, tok))
    pad = padding_id(tok)
    per_layer: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    lengths: list[int] = []
    device = arch.embed.weight.device
    for batch in chunks(list(records), batch_size):
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in prompt_inputs(
            model, processor, batch, system_prompt).items()}  # fmt: skip
        with LayerTaps(modules) as taps:
            out = arch.root.generate(
                **inputs, max_new_tokens=max_new_tokens + 1, do_sample=False, pad_token_id=pad,
                return_dict_in_generate=True,
            )  # fmt: skip
        generated = out.sequences[:, inputs["input_ids"].shape[1] :].cpu()
        for row in range(generated.shape[0]):
            n = 0
            for token in generated[row, :max_new_tokens].tolist():
                n += 1
                if token in stops:
                    break
            n = min(n, len(taps.states[layers[0]]))
            lengths.append(n)
            for layer in layers:
                steps = taps.states[layer][:n]
                per_layer[layer].append(
                    torch.stack([s[row] for s in steps]) if steps else torch.zeros(0, arch.embed.weight.shape[1])
                )
    return per_layer, lengths


@torch.no_grad()
def last_prompt_states(model: Any, processor: Any, inputs: Any, layer: int, batch_size: int = 8) -> torch.Tensor:
    """Hidden state at `layer` of the last prompt position, per row, for records or ready input batches."""
    arch = resolve(model)
    module = arch.tap_module(layer)
    device = arch.embed.weight.device
    batches = [inputs] if isinstance(inputs, Mapping) else None
    if batches is None:
        items = list(inputs)
        if items and isinstance(items[0], Mapping) and "input_ids" in items[0]:
            batches = items
        else:
            batches = [prompt_inputs(model, processor, b) for b in chunks(items, batch_size)]
    out = []
    for batch in batches:
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        captured: list[torch.Tensor] = []

        def keep(mod: nn.Module, args: Any, output: Any, store: list[torch.Tensor] = captured) -> None:
            store.append(output[0] if isinstance(output, (tuple, list)) else output)

        handle = module.register_forward_hook(keep)
        try:
            arch.root(**batch)
        finally:
            handle.remove()
        h = captured[0]
        mask = batch.get("attention_mask")
        last = (
            mask.shape[1] - 1 - mask.flip(-1).long().argmax(-1)
            if isinstance(mask, torch.Tensor)
            else torch.full((h.shape[0],), h.shape[1] - 1)
        )
        out.append(h[torch.arange(h.shape[0]), last.to(h.device)].float().cpu())
    return torch.cat(out)
