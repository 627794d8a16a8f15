"""What an attack is: `Attack` turns a `Record` into a `Case` (what the model is shown), given an `AttackContext`.

The attacks themselves: `safegate.evaluation.attacks` (text) and `safegate.evaluation.media_attacks` (image,
audio).

Example:
    >>> from safegate.evaluation.data import Record
    >>> case = Attack().apply(Record("Hi", "safe", 0), AttackContext(), dataset="demo")
    >>> case.user_text, case.modality, Attack().applies_to(Record("Hi", "safe", 0))
    ('Hi', 'text', True)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from safegate.evaluation.data import Record


class AttackError(ValueError):
    """An unknown attack name or bad attack option; the message lists what is accepted."""


@dataclass
class AttackContext:
    """What attacks need to know about the model under test.

    Args:
        tokenizer: The text tokenizer (prefill lengths are counted in its tokens; chat-template turns come from it).
        safe_token (`str`): The safety token strings injected as plain text.
        unsafe_token (`str`):
        seed (`int`): Seed of every random choice (template sampling).
        sampling_rate (`int`): Audio sampling rate the model's feature extractor expects.
    """

    tokenizer: Any = None
    safe_token: str = "<|safe|>"
    unsafe_token: str = "<|unsafe|>"
    seed: int = 0
    sampling_rate: int = 16000


@dataclass
class Case:
    """One request as the model is shown it under one attack."""

    dataset: str
    attack: str
    record: Record
    user_text: str
    assistant_prefix: str = ""
    image: Any = None
    audio: np.ndarray | None = None
    sampling_rate: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def modality(self) -> str:
        return "image" if self.image is not None else "audio" if self.audio is not None else "text"


class Attack:
    """Base class: `apply(record, ctx) -> Case`; `modality` is the input modality the model must accept."""

    name: str = "none"
    modality: str = "text"
    harmful_only: bool = False

    def unavailable(self) -> str | None:
        """Why this attack cannot run on this machine (e.g. a missing tool), or `None`."""
        return None

    def applies_to(self, record: Record) -> bool:
        return record.harmful or not self.harmful_only

    def apply(self, record: Record, ctx: AttackContext, dataset: str = "") -> Case:
        return Case(dataset, self.name, record, record.prompt)
