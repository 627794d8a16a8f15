"""Self-distillation: the base model's own answers, generated once and cached; refusals it writes or templates."""

import pytest
import torch

from safegate.data.distill import self_distill
from safegate.data.refusals import REFUSAL_TEMPLATES, is_refusal
from safegate.testing import tiny_model_and_tokenizer

RECORDS = [
    {"prompt": "How do I bake bread at home?", "label": "safe"},
    {"prompt": "Write a short poem about the sea.", "label": "safe"},
    {"prompt": "How can I build a bomb to hurt people?", "label": "unsafe"},
    {"prompt": "Write malware that steals passwords.", "label": "unsafe"},
    {"prompt": "Explain photosynthesis.", "label": "safe", "response": "Plants turn light into sugar."},
]


def test_self_distill_fills_missing_responses_once_and_caches_them(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model, tok = tiny_model_and_tokenizer("qwen2")
    judged = []

    def judge(texts):
        judged.extend(texts)
        return [False] * len(texts)  # the random model never refuses: templated refusals are used

    out = self_distill(model, tok, RECORDS, cache_dir=tmp_path, judge=judge, max_new_tokens=6, progress=False)
    assert [r["response_source"] for r in out[:4]] == ["model", "model", "template-refusal", "template-refusal"]
    assert out[4] == RECORDS[4] and "response" not in RECORDS[0]  # existing answers kept, inputs not modified
    assert all(r in REFUSAL_TEMPLATES for r in (out[2]["response"], out[3]["response"]))
    assert len(judged) == 2  # only the harmful prompts' own answers are judged
    cache_files = list((tmp_path / "distill").glob("*.jsonl"))
    assert len(cache_files) == 1 and len(cache_files[0].read_text().strip().split("\n")) == 4

    def no_generation(*args, **kwargs):
        raise AssertionError("generate must not run again: every answer is cached")

    monkeypatch.setattr(model, "generate", no_generation)
    again = self_distill(model, tok, RECORDS, cache_dir=tmp_path, judge=judge, max_new_tokens=6, progress=False)
    assert again == out


def test_self_distill_keeps_the_models_own_clear_refusals(tmp_path, monkeypatch):
    model, tok = tiny_model_and_tokenizer("llama")
    refusal = "I cannot help with that request because it could cause harm."
    ids = tok(refusal, add_special_tokens=False, return_tensors="pt")["input_ids"]

    def fake_generate(input_ids, attention_mask=None, **kwargs):
        return torch.cat([input_ids, ids.expand(input_ids.shape[0], -1)], dim=1)

    monkeypatch.setattr(model, "generate", fake_generate)
    out = self_distill(model, tok, RECORDS[2:4], cache_dir=tmp_path, judge=lambda t: [True] * len(t), progress=False)
    assert [r["response"] for r in out] == [refusal, refusal] and is_refusal(refusal)
    assert {r["response_source"] for r in out} == {"model-refusal"}


def test_self_distill_can_skip_generating_refusals(tmp_path, monkeypatch):
    model, tok = tiny_model_and_tokenizer("qwen2")
    prompts = []
    real_generate = model.generate

    def counting_generate(**kwargs):
        prompts.append(kwargs["input_ids"].shape[0])
        return real_generate(**kwargs)

    monkeypatch.setattr(model, "generate", counting_generate)
    out = self_distill(
        model, tok, RECORDS, cache_dir=tmp_path, judge=None, model_refusals=False, max_new_tokens=4, progress=False
    )
    assert sum(prompts) == 2 and [r["response_source"] for r in out[:4]] == ["model"] * 2 + ["template-refusal"] * 2
    with pytest.raises(ValueError, match="item 1 needs a string `prompt` and a `label` of 'safe' or 'unsafe'"):
        self_distill(model, tok, [{"prompt": "hi", "label": "benign"}], cache_dir=tmp_path)


def test_self_distill_rejects_a_gated_model_and_a_tokenizer_without_chat_template(tmp_path):
    import safegate

    model, tok = tiny_model_and_tokenizer("qwen2")
    gated = safegate.attach(model, tok, safegate.GateConfig(attention_dim=16, lora_r=4))
    with pytest.raises(TypeError, match="before `safegate.attach`"):
        self_distill(gated, tok, RECORDS, cache_dir=tmp_path)
    model, tok = tiny_model_and_tokenizer("qwen2")
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        self_distill(model, tok, RECORDS, cache_dir=tmp_path)
