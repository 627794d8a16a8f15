"""Training records: load them from lists, `datasets.Dataset`s or JSONL files, and validate them up front.

A record is one prompt with its target and its class:

    {"prompt": str | "messages": [chat turns], "response": str, "label": "safe" | "unsafe",
     "images": [paths]?, "audios": [paths]?}

`load_records` checks every record before anything is trained and raises one `ValueError` that names the
file, the line and the field of each bad record (missing fields, unknown labels, unreadable media). Other
keys (provenance such as `source`, `category`) are kept and ignored. `format_prompt` turns a record into the
prompt text the model sees, the same at training and at inference time.

Example:
    >>> records = load_records([{"prompt": "Hi!", "response": "Hello.", "label": "safe"}])
    >>> records[0]["label"], prompt_messages(records[0], safety_prompt="Be safe.")[0]["role"]
    ('safe', 'system')
    >>> load_records([{"prompt": "Hi!", "label": "harmless"}])
    Traceback (most recent call last):
    ...
    ValueError: 1 bad training record: record 0: field 'response' is missing (the target text: an answer or a \
refusal); record 0: field 'label' is 'harmless', expected 'safe' or 'unsafe'
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from safegate.data.io import BadLine, read_jsonl

LABELS = ("safe", "unsafe")
ROLES = ("system", "user", "assistant", "tool")
MEDIA_FIELDS = ("images", "audios")
MAX_REPORTED = 20

Record = dict[str, Any]


def load_records(
    data: Any, *, require_response: bool = True, name: str | None = None, base_dir: str | os.PathLike | None = None
) -> list[Record]:
    """Load and validate training records.

    Args:
        data (`list[dict] | datasets.Dataset | str | os.PathLike`): The records, or a JSONL file of them.
        require_response (`bool`): Whether every record needs a `response` (training does; `fit_gate` does not).
        name (`str | None`): How errors name the source (default: the file path, `record`, `dataset row`).
        base_dir (`str | os.PathLike | None`): Folder that relative media paths start from (default: the JSONL
            file's folder, else the working directory).

    Returns:
        `list[dict]`: Normalised copies of the records (media paths made absolute).

    Raises:
        `ValueError`: One error listing every bad record (up to 20) by file, line and field.
        `FileNotFoundError`: If `data` is a path that does not exist.
    """
    rows, where, base, is_file = _rows(data, name, base_dir)
    records: list[Record] = []
    problems: list[str] = []
    bad = 0
    for position, row in rows:
        label = f"{where} line {position}" if is_file else f"{where} {position}"
        if isinstance(row, BadLine):
            problems.append(f"{label}: {row}")
            bad += 1
            continue
        found = validate_record(row, require_response=require_response, base_dir=base)
        if found:
            bad += 1
            problems.extend(f"{label}: {p}" for p in found)
        else:
            records.append(_normalise(row, base))
    if problems:
        shown = problems[:MAX_REPORTED]
        more = f"; ... and {len(problems) - len(shown)} more problem(s)" if len(problems) > len(shown) else ""
        noun = "record" if bad == 1 else "records"
        raise ValueError(f"{bad} bad training {noun}: " + "; ".join(shown) + more)
    if not records:
        raise ValueError(f"{where}: no training records found; give at least one record.")
    return records


def validate_record(
    row: Any, *, require_response: bool = True, base_dir: str | os.PathLike | None = None
) -> list[str]:
    """Every problem of one record, as `field '<name>' ...` strings (empty when the record is valid)."""
    if not isinstance(row, Mapping):
        return [f"a record must be a JSON object (dict), got {type(row).__name__}"]
    problems = []
    prompt, messages = row.get("prompt"), row.get("messages")
    if prompt is None and messages is None:
        problems.append("field 'prompt' is missing (give 'prompt': str or 'messages': [chat turns])")
    elif prompt is not None and messages is not None:
        problems.append("fields 'prompt' and 'messages' are both set; give only one of them")
    elif prompt is not None and (not isinstance(prompt, str) or not prompt.strip()):
        problems.append(f"field 'prompt' must be a non-empty string, got {_short(prompt)}")
    elif messages is not None:
        problems.extend(_check_messages(messages))
    response = row.get("response")
    if response is None:
        if require_response:
            problems.append("field 'response' is missing (the target text: an answer or a refusal)")
    elif not isinstance(response, str) or not response.strip():
        problems.append(f"field 'response' must be a non-empty string, got {_short(response)}")
    label = row.get("label")
    if label is None:
        problems.append("field 'label' is missing (expected 'safe' or 'unsafe')")
    elif label not in LABELS:
        problems.append(f"field 'label' is {_short(label)}, expected 'safe' or 'unsafe'")
    if "gate" in row and not isinstance(row["gate"], bool):
        problems.append(f"field 'gate' must be true or false, got {_short(row['gate'])}")
    for media in MEDIA_FIELDS:
        problems.extend(_check_media(media, row.get(media), base_dir))
    return problems


def prompt_messages(record: Mapping[str, Any] | str, safety_prompt: str | None = None) -> list[dict[str, Any]]:
    """Chat turns of the prompt, with `safety_prompt` as a system message when the record has none."""
    if isinstance(record, str):
        messages = [{"role": "user", "content": record}]
    elif record.get("messages") is not None:
        messages = [dict(m) for m in record["messages"]]
    else:
        messages = [{"role": "user", "content": record["prompt"]}]
    if safety_prompt and messages[0].get("role") != "system":
        messages.insert(0, {"role": "system", "content": safety_prompt})
    return messages


def format_prompt(
    tokenizer_or_processor: Any, record: Mapping[str, Any] | str, safety_prompt: str | None = None
) -> str:
    """Prompt text exactly as training sees it: the chat template with the assistant header appended.

    Use the same function at inference (`tokenizer(format_prompt(tok, text), add_special_tokens=False)`) so the
    gate reads the prompt it was trained on. Tokenizers without a chat template get the turns' text joined by
    newlines.

    Example:
        >>> from safegate.testing import tiny_tokenizer
        >>> format_prompt(tiny_tokenizer(), "Hi")
        '<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n'
    """
    messages = prompt_messages(record, safety_prompt)
    owner = _template_owner(tokenizer_or_processor)
    if owner is None:
        return "\n".join(_text(m.get("content")) for m in messages)
    text = owner.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text[0] if isinstance(text, list) else text


def assistant_continuation(
    tokenizer_or_processor: Any, record: Mapping[str, Any], safety_prompt: str | None = None
) -> str:
    """Text the chat template puts after the prompt for the record's response (e.g. `answer<|im_end|>\\n`).

    Falls back to `response + eos_token` when the template does not render the prompt as a prefix.
    """
    owner = _template_owner(tokenizer_or_processor)
    response = record["response"]
    if owner is not None:
        messages = prompt_messages(record, safety_prompt)
        prompt = format_prompt(tokenizer_or_processor, record, safety_prompt)
        try:
            full = owner.apply_chat_template(
                messages + [{"role": "assistant", "content": response}], tokenize=False, add_generation_prompt=False
            )
        except Exception:  # noqa: BLE001 - some templates refuse assistant turns; use the plain fallback
            full = None
        full = full[0] if isinstance(full, list) else full
        if isinstance(full, str) and full.startswith(prompt) and response in full[len(prompt) :]:
            return full[len(prompt) :]
    tokenizer = getattr(tokenizer_or_processor, "tokenizer", None) or tokenizer_or_processor
    return response + (getattr(tokenizer, "eos_token", None) or "")


def label_id(label: str) -> int:
    """`1` for `"unsafe"`, `0` for `"safe"`."""
    return LABELS.index(label)


# ------------------------------------------------------------------------------------------------ helpers
def _rows(
    data: Any, name: str | None, base_dir: str | os.PathLike | None
) -> tuple[Iterable[tuple[int, Any]], str, Path, bool]:
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if not path.is_file():
            raise FileNotFoundError(f"training data file {str(path)!r} does not exist (expected a JSONL file).")
        base = Path(base_dir) if base_dir is not None else path.resolve().parent
        return read_jsonl(path, allow_empty=True, keep_bad_lines=True), name or str(path), base, True
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a transformers extra
        datasets = None
    if datasets is not None and isinstance(data, datasets.Dataset):
        return enumerate(data), name or "dataset row", base, False
    if isinstance(data, Mapping) or not isinstance(data, Iterable):
        raise ValueError(
            f"training data must be a list of dicts, a datasets.Dataset or a JSONL path, got {type(data).__name__}."
        )
    return enumerate(data), name or "record", base, False


def _check_messages(messages: Any) -> list[str]:
    if not isinstance(messages, list) or not messages:
        return [f"field 'messages' must be a non-empty list of chat turns, got {_short(messages)}"]
    problems = []
    for i, turn in enumerate(messages):
        if not isinstance(turn, Mapping):
            problems.append(f"field 'messages[{i}]' must be a dict with 'role' and 'content', got {_short(turn)}")
            continue
        if turn.get("role") not in ROLES:
            problems.append(f"field 'messages[{i}].role' is {_short(turn.get('role'))}, expected one of {ROLES}")
        content = turn.get("content")
        if not isinstance(content, (str, list)):
            problems.append(f"field 'messages[{i}].content' must be a string or a list of parts")
    last = messages[-1]
    if isinstance(last, Mapping) and last.get("role") == "assistant":
        problems.append(
            "field 'messages' ends with an assistant turn; the prompt must end with a user turn "
            "(put the target text in 'response')"
        )
    return problems


def _check_media(media: str, value: Any, base_dir: str | os.PathLike | None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (str, os.PathLike)):
        value = [value]
    if not isinstance(value, list):
        return [f"field '{media}' must be a list of file paths, got {_short(value)}"]
    problems = []
    for i, item in enumerate(value):
        if not isinstance(item, (str, os.PathLike)):
            problems.append(f"field '{media}[{i}]' must be a file path, got {_short(item)}")
            continue
        path = _resolve(item, base_dir)
        if not path.is_file():
            problems.append(f"field '{media}[{i}]': file {str(path)!r} does not exist")
        elif not os.access(path, os.R_OK):
            problems.append(f"field '{media}[{i}]': file {str(path)!r} is not readable")
        elif path.stat().st_size == 0:
            problems.append(f"field '{media}[{i}]': file {str(path)!r} is empty")
    return problems


def _resolve(item: str | os.PathLike, base_dir: str | os.PathLike | None) -> Path:
    path = Path(item).expanduser()
    return path if path.is_absolute() or base_dir is None else Path(base_dir) / path


def _normalise(row: Mapping[str, Any], base: Path) -> Record:
    record = {k: v for k, v in row.items() if v is not None}
    for media in MEDIA_FIELDS:
        if media in record:
            items = record[media] if isinstance(record[media], list) else [record[media]]
            record[media] = [str(_resolve(item, base).resolve()) for item in items]
    return record


def _template_owner(tokenizer_or_processor: Any) -> Any:
    for owner in (tokenizer_or_processor, getattr(tokenizer_or_processor, "tokenizer", None)):
        if owner is not None and getattr(owner, "chat_template", None):
            return owner
    return None


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return " ".join(part.get("text", "") for part in content or [] if isinstance(part, Mapping))


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
