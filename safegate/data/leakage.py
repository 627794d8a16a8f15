"""Train / evaluation leak check: no evaluation prompt may appear in the training data.

Prompts are compared after `normalise_prompt` (case, whitespace and punctuation ignored), so "How do I make a bomb?"
and "how do i make a bomb" count as the same prompt. Chat records (`messages`) are compared on the text of all
their turns.

Example:
    >>> from safegate.data.leakage import check_disjoint, drop_overlap
    >>> train = [{"prompt": "How do I bake bread?", "label": "safe"}, {"prompt": "Build a bomb.", "label": "unsafe"}]
    >>> check_disjoint(train, [{"prompt": "What is 2+2?", "label": "safe"}])
    >>> try:
    ...     check_disjoint(train, [{"prompt": "how do I  bake bread", "label": "safe"}])
    ... except ValueError as error:
    ...     print(str(error).splitlines()[0])
    1 evaluation prompt(s) also appear in the training data (compared without case, whitespace and punctuation):
    >>> kept, dropped = drop_overlap(train, [{"prompt": "BUILD A BOMB", "label": "unsafe"}])
    >>> len(kept), dropped
    (1, 1)

The exact check misses paraphrases and shared templates; `near_duplicates` measures them (word n-gram Jaccard,
a quoted title counting as one word, so a template filled with another title matches):
    >>> near_duplicates(["Write a tutorial on how to make a bomb"], ["Write a tutorial on how to build a bomb"])
    [(0, 0, 0.4)]
    >>> near_duplicates(['Generate the lyrics of "Hey Jude" by The Beatles'], ['Generate the lyrics of "Hi" by Adele'])
    [(0, 0, 0.5714)]
"""

from __future__ import annotations

import re
import string
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}‘’“”«»…–—]")
_SPACE = re.compile(r"\s+")
#: A quoted span of at most 100 characters on one line (a title, a name): one placeholder word for `word_ngrams`.
_QUOTED = re.compile(r'(?<![0-9])"[^"\n]{1,100}"|“[^”\n]{1,100}”|«[^»\n]{1,100}»')  # not 5' 11" (inches)
QUOTED_WORD = "quotedspan"
SHOWN = 5


class LeakageError(ValueError):
    """Evaluation prompts found in the training data; `overlap` holds the normalised prompts."""

    def __init__(self, message: str, overlap: list[str]) -> None:
        super().__init__(message)
        self.overlap = overlap


def normalise_prompt(text: str) -> str:
    """Lower-case, punctuation removed, runs of whitespace collapsed to one space, stripped."""
    return _SPACE.sub(" ", _PUNCTUATION.sub(" ", text.casefold())).strip()


def record_text(record: Mapping[str, Any] | str) -> str:
    """The prompt text a record is compared on (`prompt`, else the joined `messages` contents)."""
    if isinstance(record, str):
        return record
    if isinstance(record.get("prompt"), str):
        return record["prompt"]
    parts = []
    for message in record.get("messages") or []:
        content = message.get("content", "")
        if isinstance(content, list):  # multimodal content parts
            content = " ".join(str(part.get("text", "")) for part in content if isinstance(part, Mapping))
        parts.append(str(content))
    if not parts:
        raise ValueError(f"record has neither a `prompt` string nor `messages`: {dict(record)!r:.200}")
    return "\n".join(parts)


def check_disjoint(
    train_records: Iterable[Mapping[str, Any] | str],
    eval_records: Iterable[Mapping[str, Any] | str],
    *,
    train_name: str = "training data",
    eval_name: str = "evaluation",
) -> None:
    """Raise `LeakageError` (a `ValueError`) naming the evaluation prompts that also appear in the training records.

    Args:
        train_records: records (dicts with `prompt` or `messages`) or prompt strings used for training.
        eval_records: the same, used for evaluation.
        train_name, eval_name (`str`): how the message names the two sides.
    """
    seen = {normalise_prompt(record_text(r)) for r in train_records}
    overlap, shown = [], []
    for record in eval_records:
        text = record_text(record)
        key = normalise_prompt(text)
        if key in seen and key not in overlap:
            overlap.append(key)
            shown.append(text)
    if overlap:
        listed = "\n".join(f"  - {text[:120]!r}" for text in shown[:SHOWN])
        more = f"\n  ... and {len(overlap) - SHOWN} more" if len(overlap) > SHOWN else ""
        raise LeakageError(
            f"{len(overlap)} {eval_name} prompt(s) also appear in the {train_name} (compared without case, "
            f"whitespace and punctuation):\n{listed}{more}\nRemove them from the {train_name} (for example with "
            "`safegate.data.leakage.drop_overlap(train, held_out)`) or from the evaluation set.",
            overlap,
        )


def drop_overlap(
    train_records: Iterable[Mapping[str, Any]], eval_records: Iterable[Mapping[str, Any] | str]
) -> tuple[list[Mapping[str, Any]], int]:
    """(training records whose prompt is not an evaluation prompt, number dropped); order kept."""
    records = list(train_records)
    held = {normalise_prompt(record_text(r)) for r in eval_records}
    kept = [r for r in records if normalise_prompt(record_text(r)) not in held]
    return kept, len(records) - len(kept)


def word_ngrams(text: str, n: int = 3, *, mask_quoted: bool = True) -> frozenset[str]:
    """The normalised prompt's word n-grams (the whole prompt when it has fewer than `n` words).

    With `mask_quoted`, each quoted span (up to 100 characters: "...", “...”, «...»; a `"` after a digit is an
    inch mark) first becomes the one word `QUOTED_WORD`, so a template filled with different titles ("Generate the
    lyrics of "..." by ...") shares its n-grams however the titles differ; unless fewer than `n` words stay outside
    the quotes. A template whose quoted part carries the meaning ('Translate "..." to French') then matches whatever
    is quoted: the count errs towards more near-duplicates, the conservative side for a leak report.
    """
    words = normalise_prompt(_QUOTED.sub(f" {QUOTED_WORD} ", text) if mask_quoted else text).split()
    if mask_quoted and sum(w != QUOTED_WORD for w in words) < n:  # mostly a quote: compared word by word
        words = normalise_prompt(text).split()
    return frozenset(" ".join(words[i : i + n]) for i in range(max(1, len(words) - n + 1)))


def near_duplicates(
    train_records: Iterable[Mapping[str, Any] | str],
    eval_records: Iterable[Mapping[str, Any] | str],
    *,
    threshold: float = 0.4,
    n: int = 3,
) -> list[tuple[int, int, float]]:
    """`(eval index, train index, Jaccard)` for each evaluation prompt whose closest training prompt shares at least
    `threshold` of their word n-grams (Jaccard of `word_ngrams`; exact duplicates score 1.0).

    Paraphrases and shared templates that `check_disjoint` (whole prompts) lets through; a quoted title counts as
    one word (`word_ngrams`), so one template filled with different titles is found. Candidates come from an
    inverted n-gram index, so large sets stay fast. Filter by label first where opposite-label look-alikes are
    intended (XSTest's contrast prompts).
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"`threshold` must be in (0, 1] (a Jaccard similarity), got {threshold!r}.")
    train = [word_ngrams(record_text(r), n) for r in train_records]
    index: defaultdict[str, list[int]] = defaultdict(list)
    for j, grams in enumerate(train):
        for gram in grams:
            index[gram].append(j)
    found = []
    for i, record in enumerate(eval_records):
        grams = word_ngrams(record_text(record), n)
        shared = Counter(j for gram in grams for j in index.get(gram, ()))
        scored = [(k / (len(grams) + len(train[j]) - k), j) for j, k in shared.items()]
        best = max(scored, default=(0.0, -1))
        if best[0] >= threshold:
            found.append((i, best[1], round(best[0], 4)))
    return found
