"""The sampling side of one-pass verdicts (`serving.one_pass`): force the decided safety token, read it back off.

- `SafetyTokenForcer`, a vLLM V1 logits processor (`logits_processors=["safegate.serving.forced_token:
  SafetyTokenForcer"]`): each row the model left a gated pair for becomes one-hot on the token that the request's
  threshold decides (`force_decided_tokens`, the transformers path's rule: `hub.merged.decide_pair`). The threshold
  travels in `SamplingParams.extra_args["safegate_threshold"]`, set by `one_pass_params` (always: a client's own
  `vllm_xargs` cannot choose it); `None` there means the argmax of the gated pair.
- `one_pass_params` also makes room for the token (`max_tokens`, `min_tokens` + 1) and asks for the sampled
  token's logprob; `SafetyTokenStrip` takes the token off every completion of the outputs (ids, text, logprobs,
  cumulative logprob) and returns the verdict with p(unsafe) from that raw logprob. An output that does not start
  with a safety token raises `UngatedOutput`: nothing ungated is ever passed on.

vLLM is imported only when `SafetyTokenForcer` is looked up.

Example:
    >>> import torch
    >>> logits = torch.zeros(2, 6)
    >>> force_decided_tokens(logits, {1: (0.0, 2.0)}, {}, (4, 5), None)[1].tolist()
    [-inf, -inf, -inf, -inf, -inf, 0.0]
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from safegate.hub.merged import decide_pair
from safegate.modeling.config import check_threshold
from safegate.modeling.verdict import SAFE, UNSAFE

THRESHOLD_KEY = "safegate_threshold"


class UngatedOutput(RuntimeError):
    """A one-pass generation whose first token is not a safety token (the gate did not run for it): refused."""


def force_decided_tokens(
    logits: torch.Tensor,
    pairs: Mapping[int, tuple[float, float]],
    thresholds: Mapping[int, tuple[float | None]],
    safety_ids: tuple[int, int],
    default: float | None,
) -> torch.Tensor:
    """Make each row of `pairs` one-hot (0 on the decided token, `-inf` elsewhere); `thresholds[row] = (t,)` is the
    request's threshold, else `default`."""
    for row, (z_safe, z_unsafe) in pairs.items():
        threshold = thresholds[row][0] if row in thresholds else default
        label, _ = decide_pair(torch.tensor(z_safe), torch.tensor(z_unsafe), threshold)
        logits[row] = float("-inf")
        logits[row, safety_ids[1] if label == UNSAFE else safety_ids[0]] = 0.0
    return logits


def threshold_state(params: Any) -> tuple[float | None] | None:
    """The per-request state of `SafetyTokenForcer`: `(threshold,)` when the request names one, else `None`."""
    extra = getattr(params, "extra_args", None) or {}
    if THRESHOLD_KEY not in extra:
        return None
    return (check_threshold(extra[THRESHOLD_KEY], f"extra_args[{THRESHOLD_KEY!r}]"),)


def one_pass_params(params: Any, threshold: float | None) -> Any:
    """A copy of vLLM `SamplingParams` for a one-pass request: room for the safety token, its logprob, the
    threshold (see the module docstring)."""
    params = params.clone()
    if params.max_tokens is not None:
        params.max_tokens += 1
    if params.min_tokens:
        params.min_tokens += 1
    if params.logprobs is None:
        params.logprobs = 0
    params.extra_args = {**(params.extra_args or {}), THRESHOLD_KEY: check_threshold(threshold, "threshold")}
    return params


@dataclass
class SafetyTokenStrip:
    """Takes the safety token off a one-pass request's outputs (`vllm.RequestOutput`, any output kind).

    Args:
        safety_ids: `(safe_id, unsafe_id)`.
        safety_strings: Their strings (stripped off the text when the request keeps special tokens).
        cumulative: Every output repeats the tokens so far (`CUMULATIVE`, `FINAL_ONLY`); `False`: deltas.
        keep_logprobs: The caller asked for logprobs (else they are dropped again).
    """

    safety_ids: tuple[int, int]
    safety_strings: tuple[str, str]
    cumulative: bool
    keep_logprobs: bool
    verdict: tuple[str, float] | None = None
    _seen: set[int] = field(default_factory=set)

    def __call__(self, output: Any) -> Any:
        """Strip `output` in place and return it; the first verdict is kept in `self.verdict`."""
        for completion in output.outputs:
            if self.cumulative or completion.index not in self._seen:
                self._strip(completion)
            elif not self.keep_logprobs:
                completion.logprobs, completion.cumulative_logprob = None, None
        return output

    def _strip(self, completion: Any) -> None:
        ids = list(completion.token_ids)
        if not ids:
            if completion.finish_reason is None:
                return  # nothing generated yet
            raise UngatedOutput("the request finished before its safety token was generated")
        token = ids[0]
        if token not in self.safety_ids:
            raise UngatedOutput(
                f"the first generated token is {token}, not a safety token {self.safety_ids}: the one-pass gate did "
                "not run for this request (refused; see safegate.serving.one_pass)"
            )
        self._seen.add(completion.index)
        logprob = completion.logprobs[0][token].logprob if completion.logprobs else float("nan")
        unsafe = token == self.safety_ids[1]
        p_unsafe = math.exp(logprob) if unsafe else -math.expm1(logprob)
        if self.verdict is None:
            self.verdict = (UNSAFE if unsafe else SAFE, p_unsafe)
        completion.token_ids = ids[1:]
        text = completion.text
        for string in self.safety_strings:
            if text.startswith(string):
                text = text[len(string) :]
        completion.text = text
        if self.keep_logprobs:
            completion.logprobs = completion.logprobs[1:]
            if completion.cumulative_logprob is not None:
                completion.cumulative_logprob -= logprob
        else:
            completion.logprobs, completion.cumulative_logprob = None, None


def __getattr__(name: str) -> type:
    """`SafetyTokenForcer`, built on first use (it subclasses vLLM's `LogitsProcessor`)."""
    if name != "SafetyTokenForcer":
        raise AttributeError(name)
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
    from vllm.v1.sample.logits_processor.builtin import process_dict_updates

    from safegate.serving.one_pass import PENDING

    class SafetyTokenForcer(LogitsProcessor):
        """Forces the decided safety token on the rows the one-pass model gated (see the module docstring)."""

        def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
            self.thresholds: dict[int, tuple[float | None]] = {}

        @classmethod
        def validate_params(cls, sampling_params: Any) -> None:
            threshold_state(sampling_params)

        def is_argmax_invariant(self) -> bool:
            return False

        def update_state(self, batch_update: BatchUpdate | None) -> None:
            process_dict_updates(self.thresholds, batch_update, lambda params, _, __: threshold_state(params))

        def apply(self, logits: torch.Tensor) -> torch.Tensor:
            if logits.shape[0] != PENDING.rows or not PENDING.pairs:
                return logits
            return force_decided_tokens(logits, PENDING.pairs, self.thresholds, PENDING.safety_ids, PENDING.threshold)

    setattr(sys.modules[__name__], name, SafetyTokenForcer)
    return SafetyTokenForcer
