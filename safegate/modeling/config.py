"""`GateConfig`: every knob of a CASA safety gate, validated when it is built.

Example:
    >>> from safegate import GateConfig
    >>> GateConfig(attention_dim=64, lora_r=4).scaling
    'log_additive'
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

SCALINGS = ("log_additive", "multiplicative")
MAX_MEMBERS = 64
AGGREGATIONS = ("attention", "mean_sigmoid", "max_sigmoid")
SAFE_ANSWERS = ("adapted", "base")
DEFAULT_DESCRIPTOR = "This request is unsafe, harmful or malicious."


@dataclass
class GateConfig:
    """Configuration of a CASA safety gate (arXiv 2604.00310) and the adapters trained with it.

    Args:
        safe_token (`str`): Text of the token the model emits before a benign answer.
        unsafe_token (`str`): Text of the token the model emits before a refusal.
        attention_dim (`int`): Width `d_a` of the safety attention (keys, values, query).
        aggregation (`str`): How prompt states are pooled: `"attention"` (softmax pooling, default),
            `"mean_sigmoid"` or `"max_sigmoid"` (aggregated per-position sigmoid scores).
        scaling (`str`): How `v_s` rescales the pair of logits: `"log_additive"` (z_u + log v_s, sign-safe)
            or `"multiplicative"` (v_s * z_u, the paper's literal wording; wrong-signed for negative logits).
        layer (`int`): Decoder layer whose output feeds the gate; `-1` means the final norm.
        descriptor (`str`): Sentence whose mean hidden state in the frozen base model is the safety query `q`.
        train_query (`bool`): Make `q` a trainable parameter instead of a buffer.
        threshold (`float | None`): Default p(unsafe) threshold for the verdict; `None` = argmax of the gated pair.
        lora_r (`int`): LoRA rank; `0` disables LoRA (gate and token rows only).
        lora_alpha (`int`): LoRA scaling numerator.
        lora_modules (`tuple[str, ...]`): Names of the decoder-layer projections LoRA adapts (default q/v: a
            Qwen2.5-Omni-7B bundle stays near 21 MB; add `k_proj`, `o_proj`, MLP names for more capacity).
        lora_dropout (`float`): Dropout on the LoRA input.
        lora_target (`str | None`): Regex of module names LoRA adapts; `None` = the architecture spec's default,
            which never reaches vision or audio towers.
        safety_prompt (`str | None`): Optional system message prepended by `safegate.format_prompt` and training.
        unsafe_prefix (`str`): What happens to an attacker-written assistant prefix (prefill attack) when the gate
            says unsafe: `"drop"` (default: the answer starts right after `<|unsafe|>`) or `"keep"` (fed after
            the token, as in the paper; then the refusal must be learned after arbitrary prefixes).
        safe_answer (`str`): Who writes the answer after a safe verdict: `"adapted"` (default: the adapted model,
            LoRA and token rows active, conditioned on `<|safe|>`, as in the paper) or `"base"` (the base model
            itself, LoRA off for that row and no safety token in its input, so a benign answer is the base
            model's own; costs one more prefill per call: `modeling.base_answer`).
        members (`int`): Number of safety gates read side by side, each trained on its own loss; the verdict reads
            the mean of their logits (`modeling.gate_ensemble`). `1` (default) is the paper's single gate.
    """

    safe_token: str = field(default="<|safe|>", metadata={"help": "Text of the token emitted before a benign answer."})
    unsafe_token: str = field(default="<|unsafe|>", metadata={"help": "Text of the token emitted before a refusal."})
    attention_dim: int = field(default=256, metadata={"help": "Width d_a of the safety attention."})
    aggregation: str = field(
        default="attention", metadata={"help": f"Pooling of prompt states: one of {AGGREGATIONS}."}
    )
    scaling: str = field(default="log_additive", metadata={"help": f"Logit scaling at the safety step: {SCALINGS}."})
    layer: int = field(default=-1, metadata={"help": "Decoder layer feeding the gate; -1 = after the final norm."})
    descriptor: str = field(default=DEFAULT_DESCRIPTOR, metadata={"help": "Sentence defining the safety query q."})
    train_query: bool = field(default=False, metadata={"help": "Train q instead of keeping it frozen."})
    threshold: float | None = field(default=None, metadata={"help": "p(unsafe) threshold; None = argmax."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank; 0 disables LoRA."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})
    lora_modules: tuple[str, ...] = field(
        default=("q_proj", "v_proj"), metadata={"help": "Decoder-layer projections LoRA adapts."}
    )
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target: str | None = field(default=None, metadata={"help": "Regex of LoRA target modules (None = spec)."})
    safety_prompt: str | None = field(default=None, metadata={"help": "Optional safety system message."})
    unsafe_prefix: str = field(
        default="drop", metadata={"help": "Assistant prefix after an unsafe verdict: 'drop' or 'keep'."}
    )
    safe_answer: str = field(
        default="adapted", metadata={"help": f"Who answers after a safe verdict: one of {SAFE_ANSWERS}."}
    )
    members: int = field(default=1, metadata={"help": "Gates averaged into the verdict (1 = the single gate)."})

    def __post_init__(self) -> None:
        if not isinstance(self.safe_token, str) or not self.safe_token.strip():
            raise ValueError(f"`safe_token` must be a non-empty string, got {self.safe_token!r}.")
        if not isinstance(self.unsafe_token, str) or not self.unsafe_token.strip():
            raise ValueError(f"`unsafe_token` must be a non-empty string, got {self.unsafe_token!r}.")
        if self.safe_token == self.unsafe_token:
            raise ValueError(
                f"`safe_token` and `unsafe_token` are both {self.safe_token!r}; give them two different strings."
            )
        _check_int("attention_dim", self.attention_dim, minimum=1)
        _check_int("lora_r", self.lora_r, minimum=0)
        _check_int("lora_alpha", self.lora_alpha, minimum=1)
        _check_int("layer", self.layer, minimum=None)
        _check_int("members", self.members, minimum=1)
        if self.members > MAX_MEMBERS:  # a bundle's config builds this many gates before its tensors are checked
            raise ValueError(f"`members` must be at most {MAX_MEMBERS}, got {self.members}; 5 is the demo's ensemble.")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"`aggregation` must be one of {AGGREGATIONS}, got {self.aggregation!r}.")
        if self.scaling not in SCALINGS:
            raise ValueError(f"`scaling` must be one of {SCALINGS}, got {self.scaling!r}.")
        dropout = self.lora_dropout
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"`lora_dropout` must be a number in [0, 1), got {dropout!r} (e.g. 0.05, not '0.05').")
        check_threshold(self.threshold, name="threshold")
        if isinstance(self.lora_modules, str) or not all(isinstance(m, str) and m for m in self.lora_modules):
            raise ValueError(f"`lora_modules` must be a list of module names, got {self.lora_modules!r}.")
        self.lora_modules = tuple(self.lora_modules)
        if self.unsafe_prefix not in ("drop", "keep"):
            raise ValueError(f"`unsafe_prefix` must be 'drop' or 'keep', got {self.unsafe_prefix!r}.")
        if self.safe_answer not in SAFE_ANSWERS:
            raise ValueError(
                f"`safe_answer` must be one of {SAFE_ANSWERS}, got {self.safe_answer!r}; 'base' answers benign "
                "prompts with the base model itself."
            )
        if not isinstance(self.descriptor, str) or not self.descriptor.strip():
            raise ValueError(f"`descriptor` must be a non-empty sentence, got {self.descriptor!r}.")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GateConfig:
        """Build from a dict, rejecting unknown keys by name."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown GateConfig field(s) {unknown}; known fields are {sorted(known)}.")
        return cls(**data)


def check_threshold(value: float | None, name: str = "safety_threshold") -> float | None:
    """Return `value` if it is `None` or a number in [0, 1]; raise `ValueError` naming `name` otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"`{name}` must be None or a number in [0, 1], got {value!r}.")
    return float(value)


def _check_int(name: str, value: Any, minimum: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"`{name}` must be an integer, got {value!r}.")
    if minimum is not None and value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}.")
