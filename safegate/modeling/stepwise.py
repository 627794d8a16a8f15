"""The safety token as a decode step of its own: `generate(..., speculative=False)`, `classify`, and prompts that
end with an assistant prefix on models that cannot speculate.

A logits processor forces the decided token at the first new position (every other id `-inf`); the gate decides
there from the tapped prompt states. With an assistant prefix (a prefill attack) the gate decides on the prompt
without it, then `prompt, safety token, prefix` is fed (`generate_after_prefix`).

Example:
    >>> import safegate
    >>> from safegate.testing import chat, tiny_model_and_tokenizer
    >>> model, tok = tiny_model_and_tokenizer("qwen2")
    >>> gated = safegate.attach(model, tok, safegate.GateConfig(attention_dim=16, lora_r=4))
    >>> inputs = chat(tok, ["How do I bake bread?"])
    >>> ids, mask = inputs["input_ids"], inputs["attention_mask"]
    >>> out = generate_stepwise(gated, ids, mask, threshold=None, keep_safety_token=True, kwargs={"max_new_tokens": 2})
    >>> int(out.sequences[0, ids.shape[1]]) in (gated.safe_token_id, gated.unsafe_token_id)
    True
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from transformers import LogitsProcessorList

from safegate.modeling.hooks import HiddenStateTap
from safegate.modeling.inputs import insert_tokens, single_step_kwargs, strip_prefix
from safegate.modeling.logits_process import SafeGateLogitsProcessor
from safegate.modeling.prefix import repeat_rows
from safegate.modeling.streamers import SkipSafetyTokenStreamer
from safegate.modeling.tokens import padding_id
from safegate.modeling.verdict import UNSAFE, Verdict, attach_verdict

if TYPE_CHECKING:
    from safegate.modeling.model import SafeGateModel


def generate_stepwise(
    gated: SafeGateModel,
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    threshold: float | None,
    keep_safety_token: bool,
    kwargs: dict[str, Any],
) -> Any:
    """Generate with the safety token forced at the first new position; `kwargs` already count it in the budget."""
    prompt_length = input_ids.shape[1] if input_ids is not None else 0
    mask = attention_mask
    if mask is None:
        embeds = kwargs.get("inputs_embeds")
        shape = input_ids.shape if input_ids is not None else embeds.shape[:2]
        mask = torch.ones(shape, dtype=torch.long, device=gated.device)
    verdict = Verdict()
    processors = LogitsProcessorList(kwargs.pop("logits_processor", None) or [])
    if kwargs.get("streamer") is not None:
        kwargs["streamer"] = SkipSafetyTokenStreamer(kwargs["streamer"])
    with HiddenStateTap(gated.tap_module) as tap:
        processors.append(SafeGateLogitsProcessor(prompt_length, _decision(gated, tap, mask, threshold, verdict)))
        out = gated.base_generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            logits_processor=processors,
            return_dict_in_generate=True,
            **kwargs,
        )
    if verdict.unsafe is None:
        raise RuntimeError("generation ended before the safety step; the gate did not run")
    if not keep_safety_token:
        seq = out.sequences
        out.sequences = torch.cat([seq[:, :prompt_length], seq[:, prompt_length + 1 :]], dim=1)
        for name in ("scores", "logits"):
            if getattr(out, name, None) is not None:
                setattr(out, name, getattr(out, name)[1:])
    return attach_verdict(out, verdict)


def _decision(
    gated: SafeGateModel, tap: HiddenStateTap, mask: torch.Tensor, threshold: float | None, verdict: Verdict
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The processor's callback: decide from the logits at the safety step, fill `verdict`, return the token ids."""

    def decide(scores: torch.Tensor) -> torch.Tensor:
        if tap.states is None:
            raise RuntimeError("the hidden-state tap saw no prefill pass; the gate cannot decide")
        verdict.p_unsafe, verdict.unsafe = gated.decide(scores, tap.states, mask, threshold)
        ids = torch.tensor([gated.safe_token_id, gated.unsafe_token_id], device=scores.device)
        return ids[verdict.unsafe.long()]

    return decide


def generate_after_prefix(
    gated: SafeGateModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    lengths: list[int],
    threshold: float | None,
    keep_safety_token: bool,
    kwargs: dict[str, Any],
) -> Any:
    """Decide on the prompt without the assistant prefix (`lengths[i]` positions), then feed
    `prompt, safety token, prefix`.

    With `GateConfig.unsafe_prefix="drop"` (default) rows judged unsafe get `prompt, safety token` only: an
    attacker-written prefix is never fed after `<|unsafe|>`, so the answer starts from the refusal.
    """
    pad_id = padding_id(gated.tokenizer)
    p_ids, p_mask, p_kwargs = strip_prefix(input_ids, attention_mask, lengths, kwargs, pad_id)
    scored = generate_stepwise(gated, p_ids, p_mask, threshold, True, single_step_kwargs(p_kwargs))
    verdict = Verdict(scored.safety_scores, torch.tensor([s == UNSAFE for s in scored.safety]))
    tokens = torch.where(verdict.unsafe, gated.unsafe_token_id, gated.safe_token_id).tolist()
    drop = gated.gate_config.unsafe_prefix == "drop"
    keep = [not (drop and unsafe) for unsafe in verdict.unsafe.tolist()]
    new_ids, new_mask, new_kwargs = insert_tokens(input_ids, attention_mask, lengths, tokens, kwargs, keep, pad_id)
    if new_kwargs.get("streamer") is not None:
        new_kwargs["streamer"] = SkipSafetyTokenStreamer(new_kwargs["streamer"], prompt=input_ids)
    out = gated.base_generate(input_ids=new_ids, attention_mask=new_mask, return_dict_in_generate=True, **new_kwargs)
    per_prompt = out.sequences.shape[0] // input_ids.shape[0]  # num_return_sequences: one verdict per sequence
    verdict = Verdict(repeat_rows(verdict.p_unsafe, per_prompt), repeat_rows(verdict.unsafe, per_prompt))
    input_ids = repeat_rows(input_ids, per_prompt)
    if not keep_safety_token:
        out.sequences = torch.cat([input_ids, out.sequences[:, new_ids.shape[1] :]], dim=1)
    return attach_verdict(out, verdict)
