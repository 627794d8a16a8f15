"""Defenses under evaluation: the gated model and its own ungated base, behind one small interface.

`Defense` is what the harness drives: `defended(inputs)` runs the defended model and returns the answers with the
gate's verdicts and p(unsafe); `base(inputs)` runs the *same backbone without the defense* on the same inputs.
`DEFENSES` names every defense `safegate eval --defense NAME` can pick by the `module:function` path of its
factory, imported only when that defense is asked for (the decode-time defenses live in `safegate.defenses`,
which this package never imports); `register_defense(name, factory)` adds one, and `--defense module:function`
names any factory directly. A factory is called as `factory(model, processor, bundle)` and returns a `Defense`.
How the CASA defense gets its base model (PEFT's `disable_adapter`): docs/evaluation.md, "What is compared".

Example:
    >>> import safegate
    >>> from safegate.testing import tiny_model_and_tokenizer
    >>> model, tok = tiny_model_and_tokenizer("qwen2")
    >>> defense = CasaDefense(safegate.attach(model, tok, safegate.GateConfig(attention_dim=16, lora_r=4)))
    >>> inputs = dict(tok(["<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n"], return_tensors="pt"))
    >>> out = defense.defended(inputs, max_new_tokens=2)
    >>> len(out.texts), out.unsafe[0] in (True, False), 0.0 <= out.scores[0] <= 1.0
    (1, True, True)
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class DefendedBatch:
    """Answers of the defended model for one batch, with per-row verdicts and scores when the defense has them."""

    texts: list[str]
    unsafe: list[bool] | None = None
    scores: list[float] | None = None


class Defense:
    """Interface the harness drives. Subclasses set the attributes and implement `defended` and `base`.

    Attributes:
        name: registry name (`casa`, ...).
        model: the module whose `generate` runs (used for the device and multimodal input building).
        processor: the processor or tokenizer the inputs are built with.
        tokenizer: the text tokenizer (decoding, chat template, prefill token counts).
        modalities: input modalities the backbone accepts (`text`, `image`, `audio`).
        safety_tokens: the (safe, unsafe) token strings, for the injection attack; `None` if there are none.
        system_prompt: system message put before every request (for both the defended and the base model).
        notes: warnings for the report (e.g. an untrained gate).
    """

    name: str = "defense"
    model: Any = None
    processor: Any = None
    tokenizer: Any = None
    modalities: tuple[str, ...] = ("text",)
    safety_tokens: tuple[str, str] | None = None
    system_prompt: str | None = None

    def __init__(self) -> None:
        self.notes: list[str] = []

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def defended(self, inputs: dict[str, Any], max_new_tokens: int) -> DefendedBatch:
        raise NotImplementedError

    def base(self, inputs: dict[str, Any], max_new_tokens: int) -> list[str]:
        raise NotImplementedError

    @contextlib.contextmanager
    def base_mode(self) -> Iterator[None]:
        """Context in which `base` runs (entered once for the whole base pass)."""
        yield

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "modalities": list(self.modalities), "system_prompt": self.system_prompt}

    def decode_new(self, sequences: torch.Tensor, prompt_length: int) -> list[str]:
        """Decode the generated part of each row (special tokens dropped)."""
        return self.tokenizer.batch_decode(sequences[:, prompt_length:], skip_special_tokens=True)

    def greedy_kwargs(self, max_new_tokens: int) -> dict[str, Any]:
        """`generate` keyword arguments for greedy decoding (the safety tables are deterministic)."""
        kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
        kwargs.update(temperature=None, top_p=None, top_k=None)  # silence the model's sampling defaults
        if getattr(getattr(self.model, "generation_config", None), "pad_token_id", None) is None:
            kwargs["pad_token_id"] = self.tokenizer.pad_token_id
        return kwargs


class CasaDefense(Defense):
    """A `SafeGateModel` (CASA gate) and, as its base, the same backbone with every adapter disabled."""

    name = "casa"

    def __init__(self, gated: Any, threshold: float | None = None, notes: list[str] | None = None) -> None:
        super().__init__()
        self.gated = gated
        self.model = gated.peft_model
        self.processor, self.tokenizer = gated.processor, gated.tokenizer
        self.modalities = tuple(gated.arch.spec.modalities)
        self.safety_tokens = (gated.gate_config.safe_token, gated.gate_config.unsafe_token)
        self.system_prompt = gated.gate_config.safety_prompt
        self.threshold = threshold
        self.notes = list(notes or [])

    @property
    def device(self) -> torch.device:
        return self.gated.device

    @torch.no_grad()
    def defended(self, inputs: dict[str, Any], max_new_tokens: int) -> DefendedBatch:
        kwargs = self.greedy_kwargs(max_new_tokens)
        out = self.gated.generate(**inputs, **kwargs, safety_threshold=self.threshold, return_dict_in_generate=True)
        texts = self.decode_new(out.sequences, inputs["input_ids"].shape[1])
        return DefendedBatch(texts, [s == "unsafe" for s in out.safety], out.safety_scores.float().tolist())

    @torch.no_grad()
    def base(self, inputs: dict[str, Any], max_new_tokens: int) -> list[str]:
        suppress = [self.gated.safe_token_id, self.gated.unsafe_token_id]
        out = self.gated.peft_model.generate(**inputs, **self.greedy_kwargs(max_new_tokens), suppress_tokens=suppress)
        sequences = out.sequences if hasattr(out, "sequences") else out
        return self.decode_new(sequences, inputs["input_ids"].shape[1])

    @contextlib.contextmanager
    def base_mode(self) -> Iterator[None]:
        """Adapters off (LoRA and token rows; merged weights are unmerged by PEFT), re-merged afterwards."""
        merged = any(getattr(m, "merged", False) for m in self.gated.peft_model.modules())
        with self.gated.peft_model.disable_adapter():
            yield
        if merged:
            self.gated.merge_adapter()

    def info(self) -> dict[str, Any]:
        cfg = self.gated.gate_config
        return {
            **super().info(),
            "base": "the same backbone with the LoRA adapters and safety-token rows disabled (PEFT disable_adapter)",
            "gate_config": cfg.to_dict(),
            "threshold": self.threshold if self.threshold is not None else cfg.threshold,
        }


DefenseFactory = Callable[[Any, Any, "str | None"], Defense]


def make_casa(model: Any, processor: Any, bundle: str | None) -> Defense:
    """The CASA defense: the gate from `bundle` (a saved bundle), or an untrained default gate without one."""
    import safegate

    if bundle is None:
        gated = safegate.attach(model, processor)
        note = (
            "no --bundle: an untrained gate was attached (default GateConfig); its verdicts and scores are "
            "those of a random initialisation, so only the base numbers and the mechanics are meaningful"
        )
        return CasaDefense(gated, notes=[note])
    try:
        from safegate.hub.bundle import load_bundle
    except ImportError as err:
        raise ValueError(f"--bundle needs `safegate.hub.bundle`, which cannot be imported here ({err}).") from None
    loaded = load_bundle(model, processor, bundle)
    gated = getattr(loaded, "gated", loaded)
    if not hasattr(gated, "peft_model"):
        raise ValueError(f"bundle {bundle!r} did not give a SafeGateModel (got {type(loaded).__name__}).")
    return CasaDefense(gated)


DEFENSES: dict[str, str | DefenseFactory] = {
    "casa": "safegate.evaluation.defense:make_casa",
    "safecode": "safegate.defenses.factories:make_safecode",
    "safesteer": "safegate.defenses.factories:make_safesteer",
    "none": "safegate.defenses.factories:make_none",
}
"""`--defense` name -> its factory, or the `module:function` path of one (imported when the name is asked for)."""


def register_defense(name: str, factory: str | DefenseFactory) -> None:
    """Make `factory(model, processor, bundle) -> Defense` (or its `module:function` path) available as
    `safegate eval --defense NAME`."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"defense name must be an identifier such as 'safecode', got {name!r}.")
    DEFENSES[name] = factory


def import_factory(path: str) -> DefenseFactory:
    """The factory at `module:function`; `ValueError` naming the path if it cannot be imported."""
    module, _, attr = path.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"defense {path!r}: cannot import the factory ({err}).") from None


def get_defense_factory(name: str) -> DefenseFactory:
    """The factory for `name` (a key of `DEFENSES`) or for a `module:function` path.

    Raises `ValueError` listing the known names otherwise.
    """
    if name in DEFENSES:
        factory = DEFENSES[name]
        return import_factory(factory) if isinstance(factory, str) else factory
    if ":" in name:  # an importable factory, e.g. `mypkg.defenses:make_defense`
        return import_factory(name)
    raise ValueError(f"unknown defense {name!r}; choose from {sorted(DEFENSES)} or pass `module:function`.")


def as_defense(obj: Any, threshold: float | None = None) -> Defense:
    """A `Defense` as it is, or a `SafeGateModel` wrapped as the CASA defense."""
    if isinstance(obj, Defense):
        if threshold is not None and hasattr(obj, "threshold"):
            obj.threshold = threshold
        return obj
    if hasattr(obj, "peft_model") and hasattr(obj, "gate"):
        return CasaDefense(obj, threshold=threshold)
    raise TypeError(
        f"expected a safegate.SafeGateModel or a safegate.evaluation.Defense, got {type(obj).__name__}; "
        "attach a gate first (`safegate.attach(model, tokenizer)`)."
    )
