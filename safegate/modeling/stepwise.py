"""The safety token as a decode step of its own: `generate(..., speculative=False)`, `classify`, and prompts that
end with an assistant prefix on models that cannot speculate.

The gate decides in the prefill, from the tapped prompt states and the model's raw logits at the last prompt
position (a forward hook: no logits processor or generation argument has touched them); a logits processor then
forces the decided token at the first new position (every other id `-inf`). With an assistant prefix (a prefill
attack) the gate decides on the prompt without it, then `prompt, safety token, prefix` is fed
(`generate_after_prefix`).

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

import contextlib
import functools
from typing import TYPE_CHECKING, Any

import torch
from transformers import LogitsProcessorList

from safegate.modeling.hooks import HiddenStateTap
from safegate.modeling.inputs import insert_tokens, single_step_kwargs, strip_prefix
from safegate.modeling.logits_process import SafeGateLogitsProcessor
from safegate.modeling.prefix import repeat_rows
from safegate.modeling.speculative import SpeculativeDecision, SpeculativePlan, final_states_tap, pair_weight
from safegate.modeling.streamers import SkipSafetyTokenStreamer
from safegate.modeling.tokens import padding_id
from safegate.modeling.verdict import UNSAFE, Verdict, attach_verdict

if TYPE_CHECKING:
    from safegate.modeling.model import SafeGateModel

#: Per prompt row `(p_unsafe, unsafe)` the verdict never goes below, or `None` (see `SpeculativeDecision`).
Floor = tuple[torch.Tensor, torch.Tensor] | None


def generate_stepwise(
    gated: SafeGateModel,
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    threshold: float | None,
    keep_safety_token: bool,
    kwargs: dict[str, Any],
    floor: Floor = None,
) -> Any:
    """Generate with the safety token forced at the first new position; `kwargs` already count it in the budget.

    The gate decides in a forward hook on the prefill, from the model's raw output (`SpeculativeDecision` reading
    the last prompt position): nothing `generate` does to the scores afterwards (`suppress_tokens`, `sequence_bias`,
    `bad_words_ids`, `prefix_allowed_tokens_fn`, guidance, a caller's `logits_processor`, ...) reaches the verdict.
    The last logits processor then allows only the decided token, and the generated token is checked against it.
    """
    prompt_length = input_ids.shape[1] if input_ids is not None else 0
    mask = attention_mask
    if mask is None:
        embeds = kwargs.get("inputs_embeds")
        shape = input_ids.shape if input_ids is not None else embeds.shape[:2]
        mask = torch.ones(shape, dtype=torch.long, device=gated.device)
    verdict = Verdict()
    rows = mask.shape[0]
    plan = SpeculativePlan(mask, mask, mask, torch.zeros(rows, dtype=torch.long, device=mask.device), {}, tail=0)
    processors = LogitsProcessorList(kwargs.pop("logits_processor", None) or [])
    processors.append(SafeGateLogitsProcessor(prompt_length, functools.partial(_decided_ids, gated, verdict)))
    if kwargs.get("streamer") is not None:
        kwargs["streamer"] = SkipSafetyTokenStreamer(kwargs["streamer"])
    with contextlib.ExitStack() as stack:
        tap = stack.enter_context(HiddenStateTap(gated.tap_module))
        weight = pair_weight(gated)
        pair_from = None if weight is None else (final_states_tap(gated, tap, stack), weight)
        stack.enter_context(
            SpeculativeDecision(gated, tap, pair_from, plan, threshold, verdict, floor=floor, stop_on_unsafe=False)
        )
        out = gated.base_generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            logits_processor=processors,
            return_dict_in_generate=True,
            **kwargs,
        )
    if verdict.unsafe is None:
        raise RuntimeError("generation ended before the safety step; the gate did not run")
    if out.sequences.shape[1] <= prompt_length or not torch.equal(
        out.sequences[:, prompt_length], _decided_ids(gated, verdict).to(out.sequences.device)
    ):
        raise RuntimeError(
            "the generated safety token is not the one the gate decided (a generation argument changed the first "
            "new token after the gate's logits processor); refusing to return it"
        )
    if not keep_safety_token:
        seq = out.sequences
        out.sequences = torch.cat([seq[:, :prompt_length], seq[:, prompt_length + 1 :]], dim=1)
        for name in ("scores", "logits"):
            if getattr(out, name, None) is not None:
                setattr(out, name, getattr(out, name)[1:])
    return attach_verdict(out, verdict)


def _decided_ids(gated: SafeGateModel, verdict: Verdict, scores: torch.Tensor | None = None) -> torch.Tensor:
    """The decided safety id per row (what the processor allows at the safety step; `scores` are not read)."""
    if verdict.unsafe is None:
        raise RuntimeError("the gate did not decide in the prefill; the safety token cannot be chosen")
    return torch.where(verdict.unsafe, gated.unsafe_token_id, gated.safe_token_id)


def generate_after_prefix(
    gated: SafeGateModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    lengths: list[int],
    threshold: float | None,
    keep_safety_token: bool,
    kwargs: dict[str, Any],
    floor: Floor = None,
) -> Any:
    """Decide on the prompt without the assistant prefix (`lengths[i]` positions), then feed
    `prompt, safety token, prefix` (`floor`: see `SpeculativeDecision`).

    With `GateConfig.unsafe_prefix="drop"` (default) rows judged unsafe get `prompt, safety token` only: an
    attacker-written prefix is never fed after `<|unsafe|>`, so the answer starts from the refusal.
    """
    pad_id = padding_id(gated.tokenizer)
    p_ids, p_mask, p_kwargs = strip_prefix(input_ids, attention_mask, lengths, kwargs, pad_id)
    scored = generate_stepwise(gated, p_ids, p_mask, threshold, True, single_step_kwargs(p_kwargs), floor)
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


def closed_turn_floor(
    gated: SafeGateModel,
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    closed: list[bool],
    threshold: float | None,
    kwargs: dict[str, Any],
) -> Floor:
    """The verdict on the whole prompt for rows whose prefix closes its turn (`modeling.turns`), neutral elsewhere;
    `None` when no row does. Such a row is decided on the more unsafe of this and the prompt without its prefix."""
    if input_ids is None or not any(closed):
        return None
    scored = generate_stepwise(gated, input_ids, attention_mask, threshold, True, single_step_kwargs(kwargs))
    rows = torch.tensor(closed, device=scored.safety_scores.device)
    unsafe = torch.tensor([s == UNSAFE for s in scored.safety], device=rows.device)
    return torch.where(rows, scored.safety_scores, torch.zeros_like(scored.safety_scores)), unsafe & rows
