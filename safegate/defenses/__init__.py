"""Decode-time defenses behind CASA's call shape: SafeCoDe and SafeSteer (training-free), plus token-only CASA.

Every defense wraps a Hugging Face model and offers `.generate(**inputs, return_dict_in_generate=True)`, which
returns the usual output with `.safety` ("safe"/"unsafe" per row) and `.safety_scores` (the method's score in
[0, 1]) plus method-specific metadata; a plain call returns the ids. Comparison: `docs/defenses.md`.

- `SafeCoDe` (arXiv 2509.19212): contrast against a noised image + a judge's verdict on refusal tokens.
- `SafeSteer` (arXiv 2605.11716, also `SafeSteerDecoding`): a hidden-state probe steers the first steps;
  `fit_probe` fits it, `fit_alignment_vector` builds the image-side alignment vector.
- `token_only_casa`: CASA (`safegate.attach`) with no LoRA: only the gate and the two token rows train.

`safegate eval --defense safecode|safesteer|none` finds them through `safegate.evaluation.defense.DEFENSES`, which
imports `safegate.defenses.factories` when asked (importing this package registers nothing). Safety judges
(`SafetyJudge`, `HFSafetyJudge`, `OpenAISafetyJudge`, `FunctionSafetyJudge`; old names kept as aliases) classify
requests for SafeCoDe.

Example:
    >>> from safegate.defenses import SafeCoDe, FunctionJudge
    >>> from safegate.testing import tiny_model_and_tokenizer, chat
    >>> model, tok = tiny_model_and_tokenizer("llama")
    >>> out = SafeCoDe(model, tok, judge=FunctionJudge(lambda p, i: "steal" in p)).generate(
    ...     **chat(tok, ["Tell me how to steal a car"]), max_new_tokens=3, return_dict_in_generate=True)
    >>> out.safety
    ['unsafe']
"""

from __future__ import annotations

from typing import Any

from safegate.defenses.judges import (
    FunctionJudge,
    FunctionSafetyJudge,
    HFJudge,
    HFSafetyJudge,
    Judge,
    JudgeRequest,
    OpenAIJudge,
    OpenAISafetyJudge,
    SafetyJudge,
    Verdict,
)
from safegate.defenses.probe import AlignmentVector, LinearProbe, load_steering, save_steering
from safegate.defenses.probe_fit import fit_alignment_vector, fit_probe, typographic_records
from safegate.defenses.safecode import REFUSAL_STRINGS, SafeCoDe, SafeCoDeLogitsProcessor
from safegate.defenses.safesteer import SafeSteer, SafeSteerDecoding, SafeSteerLogitsProcessor


def token_only_casa(model: Any, processor: Any, config: Any = None, **overrides: Any) -> Any:
    """CASA without LoRA (`lora_r=0`): the gate and the two safety-token rows are all that trains.

    Returns an untrained `SafeGateModel` to train with `safegate.train`/`fit_gate`, with the same `generate`
    call shape as the other defenses. `overrides` are `GateConfig` fields.

    Example:
        >>> from safegate.testing import tiny_model_and_tokenizer
        >>> model, tok = tiny_model_and_tokenizer("qwen2")
        >>> gated = token_only_casa(model, tok, attention_dim=16)
        >>> gated.gate_config.lora_r, type(gated.peft_model.peft_config["default"]).__name__
        (0, 'TrainableTokensConfig')
    """
    import dataclasses

    from safegate.modeling.config import GateConfig
    from safegate.modeling.model import attach

    base = config if config is not None else GateConfig()
    return attach(model, processor, dataclasses.replace(base, lora_r=0, **overrides))


__all__ = [
    "AlignmentVector", "FunctionJudge", "FunctionSafetyJudge", "HFJudge", "HFSafetyJudge", "Judge", "JudgeRequest",
    "LinearProbe", "OpenAIJudge", "OpenAISafetyJudge", "REFUSAL_STRINGS", "SafeCoDe", "SafeCoDeLogitsProcessor",
    "SafeSteer", "SafeSteerDecoding", "SafeSteerLogitsProcessor", "SafetyJudge", "Verdict", "fit_alignment_vector",
    "fit_probe", "load_steering", "save_steering", "token_only_casa", "typographic_records",
]  # fmt: skip
