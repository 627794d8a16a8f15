"""Batched generation for the harness: every case through the base model, then through the defended model.

Both passes get identical inputs (same chat template, same system prompt, same assistant prefix, same images and
audio), built once per batch by `build_inputs`. Decoding is greedy, so the tables are deterministic. Cases are
grouped by modality and sorted by length (longest first, so memory problems show at once), and the results are
returned in the original order. The base pass runs inside `Defense.base_mode()` (for CASA: adapters disabled).
A `base_cache` dict, kept by the caller across runs of the same base model (e.g. gates trained with other seeds),
skips the base pass for text cases it already holds (keyed by `base_cache_key`: templated input, answer length).

Example:
    >>> import safegate
    >>> from safegate.evaluation.attacks import AttackContext, NoAttack
    >>> from safegate.evaluation.data import Record
    >>> from safegate.evaluation.defense import CasaDefense
    >>> from safegate.testing import tiny_model_and_tokenizer
    >>> model, tok = tiny_model_and_tokenizer("llama")
    >>> defense = CasaDefense(safegate.attach(model, tok, safegate.GateConfig(attention_dim=16, lora_r=4)))
    >>> case = NoAttack().apply(Record("Hi", "safe", 0), AttackContext(tok))
    >>> [out] = run_cases(defense, [case], batch_size=1, max_new_tokens=2, progress=False)
    >>> isinstance(out.base_text, str), out.unsafe in (True, False)
    (True, True)
"""

from __future__ import annotations

import sys
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from safegate.evaluation.attack_types import Case
from safegate.evaluation.defense import Defense


@dataclass
class Outcome:
    """Both models' answers to one case, and the gate's verdict and p(unsafe) when the defense has them."""

    base_text: str
    gated_text: str
    unsafe: bool | None = None
    score: float | None = None


def chat_text(defense: Defense, user_text: str) -> str:
    """The user turn (after the defense's system prompt) through the chat template, generation header added."""
    messages = [{"role": "system", "content": defense.system_prompt}] if defense.system_prompt else []
    messages.append({"role": "user", "content": user_text})
    for owner in (defense.tokenizer, defense.processor):
        if owner is not None and getattr(owner, "chat_template", None):
            return owner.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prefix = f"{defense.system_prompt}\n\n" if defense.system_prompt else ""
    return f"{prefix}{user_text}\n"  # a model without chat template: plain text


class InputBuilder:
    """Turns cases into model inputs for one defense (text through the tokenizer, images/audio through
    `safegate.data.multimodal.MultimodalInputBuilder`)."""

    def __init__(self, defense: Defense) -> None:
        self.defense = defense
        self._multimodal: Any = None

    def multimodal(self) -> Any:
        if self._multimodal is None:
            from safegate.data.multimodal import MultimodalInputBuilder

            gated = getattr(self.defense, "gated", None)
            config = gated.config if gated is not None else self.defense.model
            self._multimodal = MultimodalInputBuilder(config, self.defense.processor)
        return self._multimodal

    def __call__(self, cases: Sequence[Case]) -> dict[str, Any]:
        modalities = {c.modality for c in cases}
        if len(modalities) != 1:
            raise ValueError(f"one batch must hold one input modality, got {sorted(modalities)}.")
        if modalities == {"text"}:
            tok = self.defense.tokenizer
            texts = [chat_text(self.defense, c.user_text) + c.assistant_prefix for c in cases]
            side, tok.padding_side = tok.padding_side, "left"
            try:
                batch = dict(tok(texts, return_tensors="pt", padding=True, add_special_tokens=False))
            finally:
                tok.padding_side = side
        else:
            builder = self.multimodal()
            images = [[c.image] if c.image is not None else None for c in cases]
            audios = [[c.audio] if c.audio is not None else None for c in cases]
            system = self.defense.system_prompt
            texts = [
                builder.chat_text(c.user_text, len(i or ()), len(a or ()), system) + c.assistant_prefix
                for c, i, a in zip(cases, images, audios)
            ]
            batch = builder.encode(texts, images=images, audios=audios, templated=True)
        device = self.defense.device
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


BaseCache = MutableMapping[tuple[str, int], str]


def base_cache_key(defense: Defense, case: Case, max_new_tokens: int) -> tuple[str, int] | None:
    """The key of a case's base answer: the exact templated input (system prompt, request with its attack, the
    assistant prefix) and the answer length; `None` for image and audio cases, which are never cached."""
    if case.modality != "text":
        return None
    return chat_text(defense, case.user_text) + case.assistant_prefix, max_new_tokens


def check_positive(name: str, value: Any) -> None:
    """Raise `ValueError` naming `name` unless `value` is a positive integer."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")


def plan_batches(cases: Sequence[Case], batch_size: int) -> list[list[int]]:
    """Indices of `cases` in batches of one modality, longest requests first."""
    check_positive("batch_size", batch_size)
    batches = []
    for modality in ("text", "image", "audio"):
        index = [i for i, c in enumerate(cases) if c.modality == modality]
        index.sort(key=lambda i: -(len(cases[i].user_text) + len(cases[i].assistant_prefix)))
        batches += [index[s : s + batch_size] for s in range(0, len(index), batch_size)]
    return batches


def run_cases(
    defense: Defense,
    cases: Sequence[Case],
    batch_size: int = 8,
    max_new_tokens: int = 64,
    progress: bool = True,
    base_cache: BaseCache | None = None,
) -> list[Outcome]:
    """Generate base and defended answers for every case (greedy), with one progress bar over both passes.

    With `base_cache`, base answers found there are reused and the new ones are added to it.
    """
    from tqdm.auto import tqdm

    check_positive("max_new_tokens", max_new_tokens)
    batches = plan_batches(cases, batch_size)
    build = InputBuilder(defense)
    cache: BaseCache = base_cache if base_cache is not None else {}
    keys = [base_cache_key(defense, c, max_new_tokens) if base_cache is not None else None for c in cases]
    cached = {i: cache[key] for i, key in enumerate(keys) if key is not None and key in cache}
    base: list[str] = [cached.get(i, "") for i in range(len(cases))]
    todo = [i for i in range(len(cases)) if i not in cached]
    gated: list[tuple[str, bool | None, float | None]] = [("", None, None)] * len(cases)
    bar = tqdm(total=len(todo) + len(cases), desc="safegate eval: base model", unit="answer", file=sys.stderr,
               disable=not progress, dynamic_ncols=True)  # fmt: skip
    try:
        with defense.base_mode():
            for part in plan_batches([cases[i] for i in todo], batch_size):
                index = [todo[j] for j in part]
                texts = defense.base(build([cases[i] for i in index]), max_new_tokens)
                for i, text in zip(index, texts):
                    base[i] = text
                    key = keys[i]
                    if key is not None:
                        cache[key] = text
                bar.update(len(index))
        bar.set_description("safegate eval: gated model")
        for index in batches:
            out = defense.defended(build([cases[i] for i in index]), max_new_tokens)
            for row, i in enumerate(index):
                unsafe = out.unsafe[row] if out.unsafe is not None else None
                gated[i] = (out.texts[row], unsafe, out.scores[row] if out.scores is not None else None)
            bar.update(len(index))
    finally:
        bar.close()
    return [Outcome(b, *g) for b, g in zip(base, gated)]
