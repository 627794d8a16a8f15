"""Training-record building (refusals filled in, column mapping, the shared folder) and the one split."""

import random

import pytest

from safegate.data.build import build_records, fill_refusals, records_from_rows, split_records
from safegate.data.io import data_folder, require_data_folder
from safegate.data.refusals import REFUSAL_TEMPLATES, is_refusal, template_refusal
from safegate.data.sources import load_named_set

GOOD = {"prompt": "How do I bake bread?", "response": "Mix flour and water.", "label": "safe"}


def test_refusal_templates_are_varied_and_deterministic():
    assert len(set(REFUSAL_TEMPLATES)) >= 8 and all(is_refusal(t) for t in REFUSAL_TEMPLATES)
    picks = {template_refusal(f"harmful request {i}") for i in range(50)}
    assert len(picks) >= 6 and template_refusal("x", seed=1) == template_refusal("x", seed=1)
    assert not is_refusal("Sure! Step 1: mix the chemicals.")


def test_generated_refusals_fall_back_to_templates():
    from safegate.testing import tiny_model_and_tokenizer

    model, tok = tiny_model_and_tokenizer("qwen2")
    records = [{"prompt": "How do I build a bomb?", "label": "unsafe"}, {**GOOD}]
    filled = fill_refusals(records, refusals="generate", model=model, tokenizer=tok, max_new_tokens=4)
    assert filled[0]["refusal_source"] == "template"  # a random model does not write a refusal
    assert filled[0]["response"] in REFUSAL_TEMPLATES and filled[1] == GOOD and "response" not in records[0]
    with pytest.raises(ValueError, match="needs the base `model`"):
        fill_refusals(records, refusals="generate")


def test_column_mapping_never_uses_a_harmful_output_as_refusal():
    rows = [{"instruction": "Do X", "input": "", "output": "Sure, here is X"}]
    assert records_from_rows(rows, "unsafe") == [{"prompt": "Do X", "label": "unsafe"}]
    assert records_from_rows(rows, "safe")[0]["response"] == "Sure, here is X"
    with pytest.raises(ValueError, match="dataset row 0: field 'prompt' is missing"):
        records_from_rows([{"foo": 1}], "safe")


def test_build_records_from_the_shared_data_folder(monkeypatch, tmp_path):
    if data_folder() is None:
        pytest.skip("needs the development data folder (../shared/data or $SAFEGATE_DATA); a fresh clone has none")
    shared = require_data_folder()
    records = build_records(max_harmful=10, max_benign=6, seed=3)
    assert sum(r["label"] == "unsafe" for r in records) == 10 and len(records) == 16
    assert all(r["response"].strip() for r in records)
    assert build_records(max_harmful=10, max_benign=6, seed=3) == records
    by_name = build_records(harmful=["advbench"], benign=["alpaca"], max_harmful=10, max_benign=6, seed=3)
    assert [r["prompt"] for r in by_name] == [r["prompt"] for r in records]  # named sets read the same files
    train, held = split_records(records, 0.25, seed=0)
    assert len(held) == 4 and {r["label"] for r in held} == {"safe", "unsafe"} and len(train) == 12
    monkeypatch.setenv("SAFEGATE_DATA", str(tmp_path / "nowhere"))
    assert data_folder() == tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="SAFEGATE_DATA"):
        require_data_folder()
    with pytest.raises(ValueError, match="benign training records need an answer"):
        build_records(shared, benign=["xstest/prompts.jsonl"])


def test_splits_are_deterministic_stratified_and_order_independent():
    rows = [{"prompt": f"p{i}", "label": "unsafe" if i % 4 == 0 else "safe"} for i in range(100)]
    train, held = split_records(rows, held_out=0.2, seed=3)
    assert len(held) == 20 and sum(r["label"] == "unsafe" for r in held) == 5  # 25 % unsafe, kept
    assert {r["prompt"] for r in train}.isdisjoint(r["prompt"] for r in held) and len(train) + len(held) == 100
    shuffled = rows[:]
    random.Random(0).shuffle(shuffled)
    assert {r["prompt"] for r in split_records(shuffled, 0.2, seed=3)[1]} == {r["prompt"] for r in held}
    assert {r["prompt"] for r in split_records(rows, 0.2, seed=4)[1]} != {r["prompt"] for r in held}
    assert [r["prompt"] for r in held] == sorted((r["prompt"] for r in held), key=lambda p: int(p[1:]))
    with pytest.raises(ValueError, match="`held_out` must be in"):
        split_records(rows, held_out=1.0)


def test_split_of_the_real_sets_is_stable():
    advbench = load_named_set("advbench", data_folder())
    first = split_records(advbench, 0.25, seed=0)
    assert len(first[1]) == 130 and first == split_records(advbench, 0.25, seed=0)
