"""The one JSONL reader: strict by default, every bad line kept on request."""

import pytest

from safegate.data.io import BadLine, DataFileError, read_jsonl, read_objects


def test_bad_lines_raise_or_come_back_for_reporting(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n\n{not json\n[1, 2]\n')
    with pytest.raises(DataFileError, match=r"rows\.jsonl:3: malformed JSON"):
        read_jsonl(path)
    rows = read_jsonl(path, keep_bad_lines=True)
    assert [number for number, _ in rows] == [1, 3, 4] and rows[0][1] == {"a": 1} and rows[2][1] == [1, 2]
    assert isinstance(rows[1][1], BadLine) and rows[1][1].startswith("invalid JSON")
    path.write_text("")
    assert read_objects(path) == [] and read_jsonl(path, allow_empty=True) == []
