"""Speculative safety token: prefill `prompt, <|safe|>` and let the gate decide inside that same forward pass.

In a causal decoder appending `<|safe|>` leaves every state the gate reads unchanged, so `SpeculativeDecision`, a
forward hook on the generating module, takes the verdict from the prefill itself: all rows safe, that pass already
produced the first answer token; any row unsafe, the pass stops (`SpeculationMiss`), the KV cache is cut back by
one position and generation resumes from the decided tokens (or is run again where the cache cannot be cut).
The verdict never depends on the speculation. `probe_speculation_support` checks at attach time what this model
allows. Why and how: `docs/design.md` ("The speculative safety token").

Example:
    >>> import safegate
    >>> from safegate.testing import chat, tiny_model_and_tokenizer
    >>> model, tok = tiny_model_and_tokenizer("qwen2")
    >>> gated = safegate.attach(model, tok, safegate.GateConfig(attention_dim=16, lora_r=4))
    >>> inputs = chat(tok, ["How do I bake bread?"])
    >>> fast = gated.generate(**inputs, max_new_tokens=4, return_dict_in_generate=True)
    >>> slow = gated.generate(**inputs, max_new_tokens=4, speculative=False, return_dict_in_generate=True)
    >>> fast.safety == slow.safety, bool((fast.sequences == slow.sequences).all())
    (True, True)
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from safegate.modeling.hooks import HiddenStateTap, ThreadHook
from safegate.modeling.inputs import count_safety_token_in_length, insert_tokens, per_token_inputs
from safegate.modeling.kv_cache import CACHE_KWARG, output_cache
from safegate.modeling.peft_tokens import output_rows
from safegate.modeling.prefix import inserted_token_value, repeat_rows
from safegate.modeling.streamers import SkipSafetyTokenStreamer
from safegate.modeling.tokens import padding_id
from safegate.modeling.verdict import Verdict, attach_verdict

try:  # the inputs `generate` feeds only to the prefill; fall back to the 5.23 contents if the name moves
    from transformers.generation.utils import MULTIMODAL_INPUTS_TO_DROP_OUTSIDE_PREFILL as _PREFILL_ONLY
except ImportError:  # pragma: no cover - depends on the transformers version
    _PREFILL_ONLY = ("pixel_values", "pixel_values_videos", "input_features", "image_sizes", "pixel_attention_mask")

if TYPE_CHECKING:
    from safegate.modeling.model import SafeGateModel

#: Inputs that only the prefill reads: a resumed generation must not see them again.
PREFILL_ONLY_INPUTS: tuple[str, ...] = tuple(_PREFILL_ONLY) + ("feature_attention_mask",)


class SpeculationMiss(Exception):  # noqa: N818 - control flow, not an error the caller sees
    """Raised from the prefill when a row is unsafe; carries the KV cache the prefill filled."""

    def __init__(self, cache: Any) -> None:
        super().__init__("the gate decided unsafe: the speculated <|safe|> token is replaced")
        self.cache = cache


@dataclass
class SpeculativePlan:
    """The prefill input `prompt, <|safe|>, assistant prefix` (left-padded) and where the gate reads it.

    `prompt_mask` marks the positions the gate pools among the first `prompt_mask.shape[1]`: without prefixes the
    prompt's own mask (the gate reads the prompt columns only), else the full-width mask with the safety token and
    the prefixes zeroed. `tails[i]` counts the positions after row i's last prompt position (1 + its prefix length);
    `tail` is that count when every row shares it (1 without prefixes), else `None`.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_mask: torch.Tensor
    tails: torch.Tensor
    kwargs: dict[str, Any]
    tail: int | None = None


def build_plan(
    gated: SafeGateModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prefix_lengths: list[int],
    kwargs: dict[str, Any],
) -> SpeculativePlan:
    """Insert `<|safe|>` after each row's prompt (before any assistant prefix) and record the gate's positions."""
    rows = len(prefix_lengths)
    if not any(prefix_lengths):  # the common case: append one column, no per-row work
        column = input_ids.new_full((rows, 1), gated.safe_token_id)
        new_kwargs = dict(kwargs)
        for key in per_token_inputs(input_ids, kwargs):
            new_kwargs[key] = torch.cat([kwargs[key], inserted_token_value(key, kwargs[key])[0]], dim=1)
        return SpeculativePlan(
            torch.cat([input_ids, column], dim=1),
            torch.cat([attention_mask, attention_mask.new_ones(rows, 1)], dim=1),
            attention_mask,
            torch.ones(rows, dtype=torch.long, device=input_ids.device),
            new_kwargs,
            tail=1,
        )
    ids, mask, new_kwargs = insert_tokens(
        input_ids, attention_mask, prefix_lengths, [gated.safe_token_id] * rows, kwargs, [True] * rows,
        padding_id(gated.tokenizer),
    )  # fmt: skip
    tails = torch.tensor(prefix_lengths, device=ids.device) + 1
    columns = torch.arange(ids.shape[1], device=ids.device)
    prompt_mask = mask * (columns < ids.shape[1] - tails.unsqueeze(1))
    shared = prefix_lengths[0] + 1 if len(set(prefix_lengths)) == 1 else None
    return SpeculativePlan(ids, mask, prompt_mask, tails, new_kwargs, tail=shared)


class SpeculativeDecision(ThreadHook):
    """Forward hook on the generating module: decide the verdict from the first forward (the prefill) in this thread.

    Reads the tapped prompt states and the pair of safety logits at each row's last prompt position (from the final
    states times the head's two safety rows when `pair_from` gives them, else from the returned logits), fills
    `verdict`, and raises `SpeculationMiss` when any row is unsafe (unless `stop_on_unsafe=False`: the two-step path
    decides here too, from the model's raw output before any logits processor). `floor`, per prompt row `(p_unsafe,
    unsafe)`, is a verdict the decision never goes below (a prefix that closes its turn, `modeling.turns`). Removes
    itself after that first forward.
    """

    def __init__(
        self,
        gated: SafeGateModel,
        tap: HiddenStateTap,
        pair_from: tuple[HiddenStateTap, torch.Tensor] | None,
        plan: SpeculativePlan,
        threshold: float | None,
        verdict: Verdict,
        *,
        floor: tuple[torch.Tensor, torch.Tensor] | None = None,
        stop_on_unsafe: bool = True,
    ) -> None:
        super().__init__(gated.arch.root)
        self.gated, self.tap, self.pair_from, self.plan = gated, tap, pair_from, plan
        self.threshold, self.verdict = threshold, verdict
        self.floor, self.stop_on_unsafe = floor, stop_on_unsafe

    def _act(self, module: nn.Module, args: Any, output: Any) -> None:
        self._remove()  # decided once: no per-token work while decoding
        if self.tap.states is None:
            raise RuntimeError("the hidden-state tap saw no prefill pass; the gate cannot decide")
        gated = self.gated
        plan = self.plan
        taps = [("gate", self.tap)] + ([("final-norm", self.pair_from[0])] if self.pair_from is not None else [])
        for name, tap in taps:
            if tap.states is not None and tap.states.shape[1] != plan.input_ids.shape[1]:
                raise RuntimeError(
                    f"the {name} tap saw {tap.states.shape[1]} positions but the prefill has "
                    f"{plan.input_ids.shape[1]} input ids: the gate cannot tell which positions are the prompt"
                )
        rows = self.tap.states.shape[0]
        expand = rows // plan.tails.shape[0]  # num_return_sequences expands rows before the prefill
        tails = repeat_rows(plan.tails.to(self.tap.states.device), expand)
        mask = plan.prompt_mask  # gate_logit repeats its rows
        if self.pair_from is not None:
            final, weight = self.pair_from
            if final.states is None:
                raise RuntimeError("the final-norm tap saw no prefill pass; the gate cannot decide")
            last = _last_prompt_position(final.states, plan.tail, tails)
            self.verdict.last_states = last
            pair = F.linear(last, weight.to(last.dtype)).float()
        else:
            logits = output.logits if hasattr(output, "logits") else output[0]
            longest = plan.tail if plan.tail is not None else int(tails.max())
            if logits.shape[1] <= longest:
                raise RuntimeError(f"the prefill returned logits for {logits.shape[1]} positions; the gate needs more")
            scores = _last_prompt_position(logits, plan.tail, tails.to(logits.device)).float()
            self.verdict.scores = scores
            pair = scores[:, [gated.safe_token_id, gated.unsafe_token_id]]
        states = self.tap.states[:, : mask.shape[1]]  # the prompt columns the mask covers
        p_unsafe, unsafe = gated.decide_pair(pair[:, 0], pair[:, 1], states, mask, self.threshold)
        if self.floor is not None:
            floor_p, floor_unsafe = (repeat_rows(t.to(p_unsafe.device), expand) for t in self.floor)
            p_unsafe, unsafe = torch.maximum(p_unsafe, floor_p), unsafe | floor_unsafe
        self.verdict.p_unsafe, self.verdict.unsafe = p_unsafe, unsafe
        if self.stop_on_unsafe and bool(unsafe.any()):
            raise SpeculationMiss(output_cache(output))


def _last_prompt_position(values: torch.Tensor, tail: int | None, tails: torch.Tensor) -> torch.Tensor:
    """Each row's values (B, T, ...) at its last prompt position, `tails` positions before the end (one view when
    every row shares `tail`)."""
    if tail is not None:
        return values[:, values.shape[1] - 1 - tail]
    return values[torch.arange(values.shape[0], device=values.device), values.shape[1] - 1 - tails]


def pair_weight(gated: SafeGateModel) -> torch.Tensor | None:
    """The head's two safety rows, when the pair's logits are the final states times them (see
    `probe_speculation_support`)."""
    if not gated.speculation_support.pair_from_states:
        return None
    return output_rows(gated.arch.root.get_output_embeddings(), [gated.safe_token_id, gated.unsafe_token_id])


def final_states_tap(gated: SafeGateModel, tap: HiddenStateTap, stack: contextlib.ExitStack) -> HiddenStateTap:
    """A tap on the final norm (the states the head projects): the gate's own `tap` when it is on that module."""
    return tap if gated.arch.norm is gated.tap_module else stack.enter_context(HiddenStateTap(gated.arch.norm))


def logits_to_keep(gated: SafeGateModel, plan: SpeculativePlan) -> int | None:
    """Trailing positions whose logits the prefill must return to read the pair from them; `None`: the default."""
    if not gated.speculation_support.accepts_logits_to_keep:
        return None
    return (plan.tail if plan.tail is not None else int(plan.tails.max())) + 1


def resume_from_cache(
    gated: SafeGateModel, plan: SpeculativePlan, tokens: torch.Tensor, cache: Any, kwargs: dict[str, Any]
) -> Any | None:
    """Cut the speculated token from `cache` and continue from `tokens` in its place; `None` if that cannot be done.

    Needs every row to end with the safety token (no assistant prefix) and one cache row per prompt row.
    """
    if cache is None or tokens.shape[0] != plan.input_ids.shape[0] or plan.tail != 1:
        return None
    if not getattr(cache, "is_croppable", True):
        return None
    try:
        cache.crop(-1)
    except (RuntimeError, ValueError, NotImplementedError, AttributeError):
        return None
    ids = plan.input_ids.clone()
    ids[:, -1] = tokens.to(ids.device)
    resumed = {k: v for k, v in kwargs.items() if k not in PREFILL_ONLY_INPUTS}
    resumed[CACHE_KWARG] = cache
    config = kwargs.get("generation_config") or gated.generation_config
    if kwargs.get("cache_implementation") or config.cache_implementation:
        resumed["cache_implementation"] = None  # the prefill built the cache as asked; generate refuses both
    return gated.base_generate(
        input_ids=ids, attention_mask=plan.attention_mask, return_dict_in_generate=True, **resumed
    )


@dataclass(frozen=True)
class SpeculationSupport:
    """What `probe_speculation_support` found: whether `generate` may speculate, where it reads the safety pair,
    and whether the model's forward takes `logits_to_keep` (read once here, not per call)."""

    causal: bool
    pair_from_states: bool
    accepts_logits_to_keep: bool


@torch.no_grad()
def probe_speculation_support(gated: SafeGateModel) -> SpeculationSupport:
    """Check on a short sentence that appending a token changes no earlier state or logit (a causal decoder), and
    that the safety pair's logits equal the final states times the head's two rows (no logit post-processing).

    Run once by `SafeGateModel.__init__`; the result is `SafeGateModel.speculation_support`."""
    root, device = gated.arch.root, gated.device
    ids = gated.tokenizer("Speculation needs a causal decoder.", add_special_tokens=False, return_tensors="pt")
    ids = ids["input_ids"].to(device)
    longer = torch.cat([ids, torch.tensor([[gated.safe_token_id]], device=device)], dim=1)
    n = ids.shape[1]
    seen = []
    for probe_ids in (ids, longer):
        with HiddenStateTap(gated.tap_module) as tap, HiddenStateTap(gated.arch.norm) as final:
            logits = root(input_ids=probe_ids, attention_mask=torch.ones_like(probe_ids)).logits
        assert tap.states is not None and final.states is not None
        seen.append((tap.states[:, :n].float(), logits[:, n - 1].float(), final.states[:, n - 1]))
    (states, logits, last), (states_long, logits_long, _) = seen
    causal = _close(states, states_long) and _close(logits, logits_long)
    ids_pair = [gated.safe_token_id, gated.unsafe_token_id]
    weight = output_rows(root.get_output_embeddings(), ids_pair)
    from_states = weight is not None and not logit_post_processing(root.config)
    from_states = from_states and _close(F.linear(last, weight.to(last.dtype)).float(), logits[:, ids_pair])
    return SpeculationSupport(causal, from_states, accepts_logits_to_keep(root))


def accepts_logits_to_keep(model: nn.Module) -> bool:
    """Whether `model.forward` takes `logits_to_keep` (so a pass can return the logits of chosen positions only)."""
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def logit_post_processing(config: Any) -> list[str]:
    """Config fields that change logits after the head (soft-capping, scaling): the head's rows alone do not give
    them. Small random logits hide such a change from a numeric check, so the config is read as well."""
    configs = [config, *(getattr(config, name, None) for name in ("text_config", "thinker_config"))]
    found = []
    for cfg in filter(None, configs):
        for key, value in cfg.to_dict().items() if hasattr(cfg, "to_dict") else ():
            if "logit" in key and value not in (None, 1, 1.0, False) and not isinstance(value, dict | list):
                found.append(key)
    return found


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to the rounding of a different sequence length (1 % of the largest magnitude)."""
    return bool((a - b).abs().max() <= 1e-2 * a.abs().max().clamp(min=1e-6))


def generate_speculatively(
    gated: SafeGateModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    prefix_lengths: list[int],
    threshold: float | None,
    keep_safety_token: bool,
    kwargs: dict[str, Any],
    floor: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Any:
    """`SafeGateModel.generate` with the safety token speculated in the prefill (see the module docstring);
    `floor`: see `SpeculativeDecision`."""
    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    kwargs = count_safety_token_in_length(kwargs, gated.generation_config)
    plan = build_plan(gated, input_ids, mask, prefix_lengths, kwargs)
    weight = pair_weight(gated)  # None: the prefill returns the last prompt position's logits too
    keep = None if weight is not None else logits_to_keep(gated, plan)
    if keep is not None:
        asked = plan.kwargs.get("logits_to_keep")
        if asked is not None and not (isinstance(asked, int) and (asked == 0 or asked >= keep)):
            raise ValueError(
                f"`logits_to_keep={asked!r}`: the gate reads the logits of the last {keep} positions of the prefill "
                f"on this model; pass an int >= {keep}, 0 (all), or leave it out."
            )
        plan.kwargs.setdefault("logits_to_keep", keep)
    streamer = None
    if plan.kwargs.get("streamer") is not None:
        streamer = plan.kwargs["streamer"] = SkipSafetyTokenStreamer(plan.kwargs["streamer"], prompt=input_ids)
    verdict = Verdict()
    width = plan.input_ids.shape[1]
    try:
        with contextlib.ExitStack() as stack:
            tap = stack.enter_context(HiddenStateTap(gated.tap_module))
            pair_from = None if weight is None else (final_states_tap(gated, tap, stack), weight)
            stack.enter_context(SpeculativeDecision(gated, tap, pair_from, plan, threshold, verdict, floor=floor))
            out = gated.base_generate(
                input_ids=plan.input_ids, attention_mask=plan.attention_mask, return_dict_in_generate=True,
                **plan.kwargs,
            )  # fmt: skip
    except SpeculationMiss as miss:
        assert verdict.unsafe is not None
        tokens = torch.where(verdict.unsafe, gated.unsafe_token_id, gated.safe_token_id)
        if streamer is not None:
            streamer.restart()
        out = resume_from_cache(gated, plan, tokens, miss.cache, plan.kwargs)
        if out is None:  # generate again from `prompt, decided token` (and the prefix where it is kept)
            per_prompt = tokens[:: tokens.shape[0] // input_ids.shape[0]].tolist()
            drop = gated.gate_config.unsafe_prefix == "drop"
            kept = [not (drop and t == gated.unsafe_token_id) for t in per_prompt]
            ids, new_mask, new_kwargs = insert_tokens(
                input_ids, mask, prefix_lengths, per_prompt, kwargs, kept, padding_id(gated.tokenizer)
            )
            new_kwargs.pop("logits_to_keep", None)
            if streamer is not None:
                new_kwargs["streamer"] = streamer
            width = ids.shape[1]
            out = gated.base_generate(
                input_ids=ids, attention_mask=new_mask, return_dict_in_generate=True, **new_kwargs
            )
    if verdict.unsafe is None:
        raise RuntimeError("generation ended before the prefill; the gate did not run")
    return _finish(gated, out, input_ids, width, verdict, keep_safety_token)


def _finish(
    gated: SafeGateModel, out: Any, input_ids: torch.Tensor, width: int, verdict: Verdict, keep_safety_token: bool
) -> Any:
    """Drop the safety token (unless kept), or prepend the safety step to `scores` / `logits` when it is kept."""
    if keep_safety_token:
        chosen = torch.where(verdict.unsafe, gated.unsafe_token_id, gated.safe_token_id)
        raw = verdict.scores
        wanted = [name for name in ("scores", "logits") if getattr(out, name, None) is not None]
        if wanted and raw is None:  # the pair came from the states: project that one position now, only on request
            with torch.no_grad():
                raw = gated.arch.root.get_output_embeddings()(verdict.last_states).float()
        if wanted:
            assert raw is not None
            forced = torch.full_like(raw, float("-inf")).scatter_(1, chosen.unsqueeze(1).to(raw.device), 0.0)
            for name, first in (("scores", forced), ("logits", raw)):
                if name in wanted:
                    setattr(out, name, (first.to(out.sequences.device), *getattr(out, name)))
    else:
        prompt = repeat_rows(input_ids, out.sequences.shape[0] // input_ids.shape[0])
        out.sequences = torch.cat([prompt, out.sequences[:, width:]], dim=1)
    return attach_verdict(out, verdict)
