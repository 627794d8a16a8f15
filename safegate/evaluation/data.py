"""Evaluation data: JSONL files in safegate's record format, validated with `file:line` errors.

One JSON object a line: `{"prompt": str, "label": "safe"|"unsafe", ...}`. `label` says whether the *request*
is harmful (`unsafe`) or benign (`safe`); every other field (`id`, `source`, `category`, `response`, ...) is kept
as provenance. Blank lines are ignored. Every problem names the file, the line and the fix.

Example:
    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "mini.jsonl"
    >>> _ = path.write_text('{"prompt": "Hi", "label": "safe"}\\n{"prompt": "Build a bomb", "label": "unsafe"}\\n')
    >>> data = load_dataset(path)
    >>> data.name, len(data), [r.label for r in data.records]
    ('mini', 2, ['safe', 'unsafe'])
    >>> [d.name for d in load_datasets([f"xstest={path}"])]
    ['xstest']
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safegate.data.io import DataFileError, read_jsonl

LABELS = ("safe", "unsafe")

DataError = DataFileError
"""Bad evaluation data (a `ValueError`): the message names the file, the line and the fix. The same class
`safegate.data.io.read_jsonl` raises, so one `except DataError` catches unreadable files and invalid records."""


@dataclass(frozen=True)
class Record:
    """One evaluation prompt: the request, whether it is harmful, and its provenance fields."""

    prompt: str
    label: str
    index: int
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def harmful(self) -> bool:
        return self.label == "unsafe"


@dataclass
class Dataset:
    """A named list of records (the name is the file stem unless given)."""

    name: str
    records: list[Record]
    path: str | None = None

    def __len__(self) -> int:
        return len(self.records)

    def subset(self, limit: int | None, seed: int = 0) -> Dataset:
        """A seeded random subset of `limit` records, kept in file order (`None` = all)."""
        if limit is None or limit >= len(self.records):
            return self
        if limit < 1:
            raise DataError(f"`limit` must be a positive integer, got {limit!r}.")
        keep = sorted(random.Random(seed).sample(range(len(self.records)), limit))
        return Dataset(self.name, [self.records[i] for i in keep], self.path)


def parse_records(rows: Iterable[tuple[int, dict[str, Any]]], source: str) -> list[Record]:
    """Validate `prompt` and `label` of each row; the rest becomes `Record.meta`."""
    records = []
    for number, obj in rows:
        prompt, label = obj.get("prompt"), obj.get("label")
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(f"{source}:{number}: `prompt` must be a non-empty string, got {prompt!r}.")
        if label not in LABELS:
            raise DataError(
                f"{source}:{number}: `label` must be 'safe' (benign request) or 'unsafe' (harmful request), "
                f"got {label!r}."
            )
        meta = {k: v for k, v in obj.items() if k not in ("prompt", "label")}
        records.append(Record(prompt=prompt, label=label, index=len(records), meta=meta))
    return records


def load_dataset(path: str | Path, name: str | None = None) -> Dataset:
    """Load and validate one JSONL file in the record format."""
    records = parse_records(read_jsonl(path), str(path))
    return Dataset(name or Path(path).stem, records, str(path))


def from_records(name: str, rows: Sequence[dict[str, Any]]) -> Dataset:
    """A dataset from in-memory dicts (same validation as files; errors name `name` and the row number)."""
    return Dataset(name, parse_records(((i + 1, dict(r)) for i, r in enumerate(rows)), name))


def split_name(spec: str | Path) -> tuple[str | None, Path]:
    """`"NAME=FILE"` -> (NAME, FILE); a plain path (or one that exists as written) -> (None, path)."""
    text = str(spec)
    name, sep, rest = text.partition("=")
    if sep and name and rest and "/" not in name and not Path(text).exists():
        return name, Path(rest)
    return None, Path(text)


def load_datasets(paths: Sequence[str | Path]) -> list[Dataset]:
    """Load several files, each `FILE` or `NAME=FILE`.

    Names default to file stems, made unique with the parent folder when two stems clash.
    """
    if not paths:
        raise DataError("no data file given; pass at least one `--data FILE.jsonl` (or `--data NAME=FILE.jsonl`).")
    specs = [split_name(p) for p in paths]
    stems = [path.stem for name, path in specs if name is None]
    datasets = []
    for name, path in specs:
        if name is None:
            name = f"{path.parent.name}/{path.stem}" if stems.count(path.stem) > 1 else path.stem
        datasets.append(load_dataset(path, name))
    names = [d.name for d in datasets]
    if len(set(names)) != len(names):
        raise DataError(f"data sets must have distinct names, got {names}; name them with `--data NAME=FILE`.")
    return datasets


def coerce_datasets(datasets: Any) -> list[Dataset]:
    """Accept `Dataset`s, paths, or a `{name: [record dicts]}` mapping (the Python API's inputs)."""
    if isinstance(datasets, (str, Path, Dataset)):
        datasets = [datasets]
    if isinstance(datasets, dict):
        return [d if isinstance(d, Dataset) else from_records(str(n), d) for n, d in datasets.items()]
    out, paths = [], []
    for item in datasets:
        if isinstance(item, Dataset):
            out.append(item)
        elif isinstance(item, (str, Path)):
            paths.append(item)
        else:
            raise DataError(
                f"`datasets` items must be Dataset objects or JSONL paths, got {type(item).__name__}; "
                "use safegate.evaluation.from_records(name, rows) for in-memory records."
            )
    out.extend(load_datasets(paths) if paths else [])
    names = [d.name for d in out]
    if not out or len(set(names)) != len(names):
        raise DataError(f"`datasets` must be non-empty with distinct names, got {names}.")
    return out
