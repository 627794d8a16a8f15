"""Training records: loading, validation errors, prompt formatting, encoding, collation."""

import json

import datasets
import pytest
import torch

from safegate.data.records import assistant_continuation, format_prompt, load_records
from safegate.testing import tiny_tokenizer
from safegate.training import collate
from safegate.training.collate import CASACollator, build_inputs, concat_model_inputs, encode_record

GOOD = {"prompt": "How do I bake bread?", "response": "Mix flour and water.", "label": "safe"}
SAFE_ID, UNSAFE_ID = 700, 701


def test_records_from_list_dataset_and_jsonl(tmp_path):
    image = tmp_path / "cat.png"
    image.write_bytes(b"\x89PNG fake")
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({**GOOD, "images": ["cat.png"], "source": "x"}) + "\n\n")
    from_file = load_records(path)
    assert from_file[0]["images"] == [str(image.resolve())] and from_file[0]["source"] == "x"
    assert load_records([GOOD]) == [GOOD]
    assert load_records(datasets.Dataset.from_list([GOOD, {**GOOD, "label": "unsafe"}]))[1]["label"] == "unsafe"
    messages = {"messages": [{"role": "user", "content": "hi"}], "response": "hello", "label": "safe"}
    assert load_records([messages])[0]["messages"][0]["content"] == "hi"
    assert load_records([{"prompt": "p", "label": "unsafe"}], require_response=False)[0]["label"] == "unsafe"


@pytest.mark.parametrize(
    "record, needle",
    [
        ({"response": "x", "label": "safe"}, "field 'prompt' is missing (give 'prompt': str or 'messages'"),
        ({**GOOD, "label": "benign"}, "field 'label' is 'benign', expected 'safe' or 'unsafe'"),
        ({**GOOD, "response": ""}, "field 'response' must be a non-empty string"),
        ({**GOOD, "messages": [{"role": "user", "content": "x"}]}, "fields 'prompt' and 'messages' are both set"),
        (
            {
                "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                "response": "c",
                "label": "safe",
            },
            "ends with an assistant turn",
        ),  # fmt: skip
        ({"messages": [{"role": "robot", "content": "a"}], "response": "c", "label": "safe"}, "messages[0].role"),
        ({**GOOD, "audios": ["/no/such.wav"]}, "field 'audios[0]': file '/no/such.wav' does not exist"),
        ({**GOOD, "images": "x.png"}, "field 'images[0]'"),
        ("just a string", "must be a JSON object"),
    ],
)
def test_each_bad_field_is_named(record, needle):
    with pytest.raises(ValueError, match="bad training record") as err:
        load_records([GOOD, record])
    assert needle in str(err.value)
    assert "record 1:" in str(err.value)


def test_unreadable_media_and_missing_file(tmp_path):
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="is empty"):
        load_records([{**GOOD, "audios": [str(empty)]}])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_records(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="no training records"):
        load_records([])


def test_many_problems_are_reported_in_one_error():
    with pytest.raises(ValueError) as err:
        load_records([{"prompt": "p"}] * 30)
    message = str(err.value)
    assert message.startswith("30 bad training records") and "more problem(s)" in message


def test_prompt_text_matches_the_inference_prompt():
    tok = tiny_tokenizer()
    assert format_prompt(tok, GOOD) == tok.apply_chat_template(
        [{"role": "user", "content": GOOD["prompt"]}], tokenize=False, add_generation_prompt=True
    )
    system = format_prompt(tok, GOOD, safety_prompt="Be safe.")
    assert system.startswith("<|im_start|>system\nBe safe.<|im_end|>")
    assert assistant_continuation(tok, GOOD) == "Mix flour and water.<|im_end|>\n"


def test_encoded_layout_puts_the_safety_token_between_prompt_and_response():
    tok = tiny_tokenizer()
    built = build_inputs(tok, GOOD)
    ex = encode_record(tok, {**GOOD, "label": "unsafe"}, safe_id=SAFE_ID, unsafe_id=UNSAFE_ID)
    n = ex["prompt_length"]
    assert ex["input_ids"][:n] == built["prompt_ids"] and ex["input_ids"][n] == UNSAFE_ID
    assert ex["input_ids"][n + 1 :] == built["response_ids"] and ex["response_start"] == n + 1
    ssft = encode_record(tok, GOOD, safe_id=SAFE_ID, unsafe_id=UNSAFE_ID, method="ssft")
    assert ssft["input_ids"] == built["prompt_ids"] + built["response_ids"] and ssft["response_start"] == n
    short = encode_record(tok, GOOD, safe_id=SAFE_ID, unsafe_id=UNSAFE_ID, max_length=n + 3)
    assert len(short["input_ids"]) == n + 3
    assert encode_record(tok, GOOD, safe_id=SAFE_ID, unsafe_id=UNSAFE_ID, max_length=n) is None


def test_collator_right_pads_and_masks_prompt_and_padding():
    tok = tiny_tokenizer()
    long = {**GOOD, "prompt": "Write a short poem about the sea and the moon, please."}
    examples = [encode_record(tok, r, safe_id=SAFE_ID, unsafe_id=UNSAFE_ID) for r in (GOOD, long)]
    batch = CASACollator(tok.pad_token_id)(examples)
    for i, ex in enumerate(examples):
        n, p = len(ex["input_ids"]), ex["prompt_length"]
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
        assert batch["prompt_mask"][i, :p].all() and not batch["prompt_mask"][i, p:].any()
        assert (batch["labels"][i, : p + 1] == -100).all()  # prompt and safety token are not token-CE targets
        assert batch["labels"][i, p + 1 : n].tolist() == ex["input_ids"][p + 1 :]
        assert (batch["labels"][i, n:] == -100).all() and batch["safety_index"][i] == p - 1
    assert batch["class_labels"].tolist() == [0, 0]


def test_extra_model_inputs_pass_through_the_collator(tmp_path, monkeypatch):
    merged = concat_model_inputs([{"pixel_values": torch.ones(4, 3)}, {}, {"pixel_values": torch.zeros(2, 3)}])
    assert merged["pixel_values"].shape == (6, 3)
    with pytest.raises(ValueError, match="cannot batch the model input 'x'"):
        concat_model_inputs([{"x": torch.ones(1, 2)}, {"x": torch.ones(1, 3)}])
    image = tmp_path / "a.png"
    image.write_bytes(b"fake")
    record = {**GOOD, "images": [str(image)]}
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match="plain tokenizer"):
        build_inputs(tok, record)

    def fake(processor, rec, safety_prompt):  # what a multimodal processor returns
        return {"prompt_ids": [1, 2, 3], "response_ids": [4], "model_inputs": {"pixel_values": torch.ones(4, 6)}}

    monkeypatch.setattr(collate, "processor_input_builder", fake)
    ex = encode_record(tok, record, safe_id=SAFE_ID, unsafe_id=UNSAFE_ID)
    batch = CASACollator(0)([ex, ex])
    assert batch["input_ids"][0].tolist() == [1, 2, 3, SAFE_ID, 4] and batch["pixel_values"].shape == (8, 6)
