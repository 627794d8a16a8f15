"""Human-labelled answers for fitting and measuring the refusal classifier, and how they are split and augmented.

The labels: XSTest completions of five models (`1_full_compliance` = comply, `2_full_refusal` /
`3_partial_refusal` = refuse), PyRIT's human-scored refusals, and Alpaca's human-written seed answers as compliant
examples. Why answers are augmented with word prefixes is in `docs/real-model.md` ("The refusal judge").

Example:
    >>> import random
    >>> word_prefixes("one two three four five six", random.Random(0), count=1, low=2, high=4)
    ['one two three']
    >>> items = [LabelledResponse(f"answer {i}", i % 2 == 0, f"prompt {i // 2}", "demo") for i in range(8)]
    >>> train, held = split_by_group(items, held_out=0.25)
    >>> len(train), len(held), {i.group for i in train}.isdisjoint({i.group for i in held})
    (6, 2, True)
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass

from safegate.data.io import read_objects, require_data_folder

XSTEST_LABELS = ("1_full_compliance", "2_full_refusal", "3_partial_refusal")


@dataclass
class LabelledResponse:
    """One human-labelled response: `refusal` is the label, `group` the prompt (splits never cut a group)."""

    text: str
    refusal: bool
    group: str
    source: str


def load_labelled_responses(
    data_dir: str | os.PathLike | None = None, include_pyrit: bool = True
) -> list[LabelledResponse]:
    """Human-labelled responses from a data folder (`xstest/completions_*.jsonl`, `judge/refusal_labels.jsonl`).

    Raises:
        FileNotFoundError: no data folder, or it holds no XSTest completions.
    """
    folder = require_data_folder(data_dir)
    files = sorted((folder / "xstest").glob("completions_*.jsonl"))
    if not files:
        raise FileNotFoundError(
            f"no XSTest completions (`xstest/completions_*.jsonl`) under `data_dir`={str(folder)!r}; pass the data "
            "folder that holds them, or use the packaged head (`RefusalClassifier.load_or_fit()` without data)."
        )
    items = []
    for path in files:
        for row in read_objects(path):
            label = row["human_label"]
            if label not in XSTEST_LABELS:
                raise ValueError(f"{path}: unknown `human_label` {label!r}.")
            items.append(LabelledResponse(row["response"], label != "1_full_compliance", row["prompt"], path.stem))
    pyrit = folder / "judge" / "refusal_labels.jsonl"
    if include_pyrit and pyrit.is_file():
        for row in read_objects(pyrit):
            items.append(
                LabelledResponse(row["assistant_response"], str(row["human_score"]) == "1", row["objective"], "pyrit")
            )
    return items


def load_compliant_answers(data_dir: str | os.PathLike | None = None) -> list[LabelledResponse]:
    """Human-written answers to benign tasks (Alpaca seed tasks in the data folder): compliant by construction."""
    path = require_data_folder(data_dir) / "benign" / "alpaca_seed_tasks.jsonl"
    if not path.is_file():
        return []
    return [LabelledResponse(row["response"], False, row["prompt"], "alpaca") for row in read_objects(path)]


def word_prefixes(text: str, rng: random.Random, count: int = 2, low: int = 3, high: int = 30) -> list[str]:
    """`count` random prefixes of `text`, each `low`..`high` words long (only those shorter than the text)."""
    words = text.split()
    lengths = [rng.randint(low, high) for _ in range(count)]
    return [" ".join(words[:n]) for n in lengths if n < len(words)]


def split_by_group(
    items: Sequence[LabelledResponse], held_out: float = 0.2, seed: int = 0
) -> tuple[list[LabelledResponse], list[LabelledResponse]]:
    """Deterministic split: a `held_out` share of the prompts (groups), with all their responses, is held out."""
    if not 0.0 < held_out < 1.0:
        raise ValueError(f"`held_out` must be in (0, 1), got {held_out!r}.")
    groups = sorted({item.group for item in items})
    random.Random(seed).shuffle(groups)
    test_groups = set(groups[: max(1, round(held_out * len(groups)))])
    train = [item for item in items if item.group not in test_groups]
    test = [item for item in items if item.group in test_groups]
    return train, test


def labels_fingerprint(items: Sequence[LabelledResponse]) -> str:
    """A short hash of the labelled texts: two heads fitted on the same data carry the same one."""
    digest = hashlib.sha256()
    for item in items:
        digest.update(f"{item.source}\0{item.group}\0{item.refusal}\0{item.text}\0".encode())
    return digest.hexdigest()[:16]
