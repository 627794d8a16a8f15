"""`GateConfig(safe_answer="base")`: after a safe verdict the base model itself answers.

The gate decides first, exactly as `classify` does (the adapted model's prompt states, the closed-turn floor,
an assistant prefix left out). Then one `generate` call runs every row: a safe row is fed its prompt (and
assistant prefix) unchanged with LoRA off for that row, so its answer is the base model's own; an unsafe row is
fed `prompt, <|unsafe|>` with LoRA on and answers as the adapted model was trained to (the prefix dropped or
kept per `GateConfig.unsafe_prefix`). Which rows use LoRA is PEFT's own mixed-batch inference (`adapter_names`,
"__base__" = the base layer), passed by `RowAdapters` in this thread only. Neither safety id can be generated
after the verdict. Cost: the verdict's prefill comes on top of the answer's (no speculation).

Example:
    >>> import safegate
    >>> from safegate.testing import chat, tiny_model_and_tokenizer
    >>> model, tok = tiny_model_and_tokenizer("qwen2")
    >>> config = safegate.GateConfig(attention_dim=16, lora_r=4, safe_answer="base")
    >>> gated = safegate.attach(model, tok, config)
    >>> out = gated.generate(**chat(tok, ["How do I bake bread?"]), max_new_tokens=3, return_dict_in_generate=True)
    >>> out.safety[0] in ("safe", "unsafe")
    True
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import torch
from peft.tuners.lora import LoraLayer
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn
from transformers import LogitsProcessorList, SuppressTokensLogitsProcessor

from safegate.modeling.inputs import insert_tokens, single_step_kwargs, strip_prefix
from safegate.modeling.prefix import repeat_rows
from safegate.modeling.stepwise import Floor, generate_stepwise
from safegate.modeling.streamers import SkipSafetyTokenStreamer
from safegate.modeling.tokens import padding_id
from safegate.modeling.verdict import UNSAFE, Verdict, attach_verdict

if TYPE_CHECKING:
    from safegate.modeling.model import SafeGateModel

#: PEFT's adapter name for "no adapter" in mixed-batch inference.
BASE = "__base__"


class RowAdapters:
    """Give every PEFT LoRA layer and token wrapper in `model` the per-row `adapter_names`, in this thread only.

    `names[i]` is the adapter of input row i (`"__base__"`: none). When `generate` repeats rows (beams,
    `num_return_sequences`), each name is repeated the same way. Other threads running the model are untouched.
    """

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        self.modules = [m for m in model.modules() if isinstance(m, (LoraLayer, AuxiliaryTrainingWrapper))]
        self.names = names
        self._thread = threading.get_ident()
        self._handles: list[Any] = []

    def _pre_forward(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if threading.get_ident() != self._thread or not args or not isinstance(args[0], torch.Tensor):
            return None
        rows = args[0].shape[0]
        if rows % len(self.names):
            raise RuntimeError(f"{rows} input rows for {len(self.names)} per-row adapters: cannot tell them apart")
        return args, {**kwargs, "adapter_names": [n for n in self.names for _ in range(rows // len(self.names))]}

    def __enter__(self) -> RowAdapters:
        self._thread = threading.get_ident()
        self._handles = [m.register_forward_pre_hook(self._pre_forward, with_kwargs=True) for m in self.modules]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def generate_with_base_answers(
    gated: SafeGateModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    lengths: list[int],
    threshold: float | None,
    keep_safety_token: bool,
    kwargs: dict[str, Any],
    floor: Floor = None,
) -> Any:
    """Decide on each prompt (without its assistant prefix), then answer: base model for safe rows, adapted model
    after `<|unsafe|>` for unsafe rows (see the module docstring). Returns what `SafeGateModel.generate` does."""
    if gated.merged:
        raise ValueError(
            "GateConfig.safe_answer='base' turns LoRA off for safe rows, which a merged adapter cannot: call "
            "`gated.unmerge_adapter()` first (or use safe_answer='adapted' with a merged adapter)."
        )
    pad_id = padding_id(gated.tokenizer)
    p_ids, p_mask, p_kwargs = strip_prefix(input_ids, attention_mask, lengths, kwargs, pad_id)
    scored = generate_stepwise(gated, p_ids, p_mask, threshold, True, single_step_kwargs(p_kwargs), floor)
    unsafe = [s == UNSAFE for s in scored.safety]
    verdict = Verdict(scored.safety_scores, torch.tensor(unsafe))
    keep = [not (unsafe_row and gated.gate_config.unsafe_prefix == "drop") for unsafe_row in unsafe]
    fed = [gated.unsafe_token_id if unsafe_row else None for unsafe_row in unsafe]
    new_ids, new_mask, new_kwargs = insert_tokens(input_ids, attention_mask, lengths, fed, kwargs, keep, pad_id)
    processors = LogitsProcessorList(new_kwargs.pop("logits_processor", None) or [])
    safety_ids = [gated.safe_token_id, gated.unsafe_token_id]
    processors.append(SuppressTokensLogitsProcessor(safety_ids, device=new_ids.device))
    if new_kwargs.get("streamer") is not None:
        new_kwargs["streamer"] = SkipSafetyTokenStreamer(new_kwargs["streamer"], prompt=input_ids)
    names = ["default" if unsafe_row else BASE for unsafe_row in unsafe]
    with RowAdapters(gated.peft_model, names):
        out = gated.base_generate(
            input_ids=new_ids,
            attention_mask=new_mask,
            logits_processor=processors,
            return_dict_in_generate=True,
            **new_kwargs,
        )
    per_prompt = out.sequences.shape[0] // input_ids.shape[0]  # num_return_sequences: one verdict per sequence
    answers = out.sequences[:, new_ids.shape[1] :]
    if keep_safety_token:  # every row shows its decided token where an adapted answer would have it
        decided = [gated.unsafe_token_id if u else gated.safe_token_id for u in unsafe]
        shown, _, _ = insert_tokens(input_ids, attention_mask, lengths, decided, {}, keep, pad_id)
        prompt_part = repeat_rows(shown, per_prompt)
    else:
        prompt_part = repeat_rows(input_ids, per_prompt)
    out.sequences = torch.cat([prompt_part.to(answers.device), answers], dim=1)
    verdict = Verdict(repeat_rows(verdict.p_unsafe, per_prompt), repeat_rows(verdict.unsafe, per_prompt))
    return attach_verdict(out, verdict)
