"""One JSONL reader and one data-folder lookup for the whole library.

Every reader of record files goes through `read_jsonl`, so a bad file fails the same way everywhere: one
`DataFileError` (a `ValueError`) naming the file and, where there is one, the line. The data folder is
`data_dir` if given, else `$SAFEGATE_DATA`, else `../shared/data` next to a development checkout.

Example:
    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "rows.jsonl"
    >>> _ = path.write_text('{"prompt": "hi", "label": "safe"}\\n\\n{"prompt": "yo", "label": "safe"}\\n')
    >>> [number for number, _ in read_jsonl(path)]
    [1, 3]
    >>> _ = path.write_text('{"prompt": "hi"}\\n[1, 2]\\n')
    >>> read_jsonl(path)
    Traceback (most recent call last):
    ...
    safegate.data.io.DataFileError: .../rows.jsonl:2: expected a JSON object per line, got list.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

DATA_ENV = "SAFEGATE_DATA"
"""Environment variable naming the data folder."""


class DataFileError(ValueError):
    """A data file cannot be read: the message names the file, the line where there is one, and the fix."""


class BadLine(str):
    """A JSONL line that is not valid JSON, as `read_jsonl(..., keep_bad_lines=True)` returns it: the reason."""


def read_utf8(path: str | os.PathLike) -> str:
    """The text of a UTF-8 file; bytes that are not UTF-8 raise `DataFileError` naming the file and the line."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        number = data[: err.start].count(b"\n") + 1
        reason = f"{err.reason} at byte {err.start}"
        message = f"{path}:{number}: line {number} is not UTF-8 text ({reason}); save it as UTF-8."
        raise DataFileError(message) from None


def read_jsonl(
    path: str | os.PathLike, *, allow_empty: bool = False, keep_bad_lines: bool = False
) -> list[tuple[int, Any]]:
    """`(line_number, object)` for every non-blank line of a UTF-8 JSONL file.

    Raises `DataFileError` for a missing file or a folder, bytes that are not UTF-8, malformed JSON, a line that
    is not a JSON object, or (unless `allow_empty`) a file without records. With `keep_bad_lines`, a line that
    is not JSON comes back as a `BadLine` (its reason) and any JSON value is returned as it is, so that a caller
    can report every bad line at once (`safegate.data.records.load_records` does).
    """
    path = Path(path)
    if not path.is_file():
        hint = "it is a folder" if path.is_dir() else "no such file"
        raise DataFileError(f"{path}: cannot read data file ({hint}); pass an existing JSONL file.")
    text = read_utf8(path)
    rows = []
    # split on "\n" only: `str.splitlines` would also split on U+2028 and friends, which JSON strings may hold
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            if keep_bad_lines:
                rows.append((number, BadLine(f"invalid JSON ({err.msg} at column {err.colno})")))
                continue
            raise DataFileError(f"{path}:{number}: malformed JSON ({err.msg} at column {err.colno}).") from None
        if not isinstance(obj, dict) and not keep_bad_lines:
            raise DataFileError(f"{path}:{number}: expected a JSON object per line, got {type(obj).__name__}.")
        rows.append((number, obj))
    if not rows and not allow_empty:
        raise DataFileError(f"{path}: the file holds no records; add one JSON object per line.")
    return rows


def read_objects(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The objects of a JSONL file, without line numbers (same checks as `read_jsonl`; empty files allowed)."""
    return [obj for _, obj in read_jsonl(path, allow_empty=True)]


def development_data_folder() -> Path:
    """`../shared/data` next to a development checkout of this repository (it may not exist)."""
    return Path(__file__).resolve().parents[3] / "shared" / "data"


def data_folder(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The data folder: `data_dir` if given, else `$SAFEGATE_DATA`, else the development checkout's
    `../shared/data` when it exists, else `None`."""
    value = data_dir if data_dir is not None else os.environ.get(DATA_ENV)
    if value:
        return Path(value).expanduser()
    dev = development_data_folder()
    return dev if dev.is_dir() else None


def require_data_folder(data_dir: str | os.PathLike | None = None) -> Path:
    """`data_folder(data_dir)`, or a `FileNotFoundError` that says how to point at one."""
    folder = data_folder(data_dir)
    if folder is None or not folder.is_dir():
        where = f"{str(folder)!r} does not exist" if folder is not None else "none found"
        raise FileNotFoundError(
            f"data folder: {where}. Pass `data_dir=` (recipes: `data.dir`) or set ${DATA_ENV} to the folder with "
            "the data sets."
        )
    return folder
