"""Issue 17, item 18: a gated model is a first-class `pipeline("text-generation")` model — no error-level log
from transformers, the verdict (`safety`, `safety_score`) in every generated record, chat inputs, batches,
streaming, and never the safety token in the text."""

import logging

import pytest
import torch
from transformers import pipeline
from transformers.generation.streamers import BaseStreamer
from transformers.pipelines import PIPELINE_REGISTRY
from transformers.pipelines.text_generation import TextGenerationPipeline

import safegate
from safegate.modeling.pipeline import SafeGateTextGenerationPipeline, register
from safegate.testing import chat, tiny_model_and_tokenizer
from tests.conftest import SMALL


@pytest.fixture
def hf_errors(caplog):
    """Error-level records of the `transformers` loggers (they do not propagate to the root logger)."""
    hf_logger = logging.getLogger("transformers")
    hf_logger.addHandler(caplog.handler)
    caplog.set_level(logging.ERROR, logger="transformers")
    yield lambda: [r for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("transformers")]
    hf_logger.removeHandler(caplog.handler)


@pytest.fixture
def gated_tok(arch):
    model, tok = tiny_model_and_tokenizer(arch)
    return safegate.attach(model, tok, safegate.GateConfig(**SMALL)), tok


def _force(gated, bias):
    """Gate logit `bias` for every prompt (large positive: unsafe, large negative: safe)."""
    with torch.no_grad():
        gated.gate.out.weight.zero_()
        gated.gate.out.bias.fill_(bias)


def _texts(records):
    out = []
    for record in records:
        text = record["generated_text"]
        out.append(text if isinstance(text, str) else " ".join(m["content"] for m in text))
    return out


def test_stock_check_logs_the_error_the_fix_removes(gated_tok, hf_errors):
    """Control: the capture sees transformers' error with its stock pipeline class (what users got before)."""
    gated, tok = gated_tok
    pipeline("text-generation", model=gated, tokenizer=tok, pipeline_class=TextGenerationPipeline)
    assert any("SafeGateModel" in r.getMessage() and "not supported" in r.getMessage() for r in hf_errors())


def test_text_generation_pipeline_supports_gated_model(gated_tok, hf_errors):
    gated, tok = gated_tok
    generator = pipeline("text-generation", model=gated, tokenizer=tok)
    assert isinstance(generator, SafeGateTextGenerationPipeline)
    out = generator("How do I bake bread?", max_new_tokens=4)
    assert hf_errors() == []
    assert len(out) == 1 and out[0]["safety"] in ("safe", "unsafe")
    assert out[0]["safety_score"] == pytest.approx(
        float(gated.classify(**tok(["How do I bake bread?"], return_tensors="pt"))[0]), abs=1e-5
    )


@pytest.mark.parametrize("bias, label", [(50.0, "unsafe"), (-50.0, "safe")])
def test_forced_verdict_and_no_safety_token_in_text(gated_tok, hf_errors, bias, label):
    gated, tok = gated_tok
    _force(gated, bias)
    generator = safegate.pipeline("text-generation", model=gated)
    tokens = (gated.gate_config.safe_token, gated.gate_config.unsafe_token)
    for kwargs in ({}, {"return_full_text": False}, {"keep_safety_token": True}):
        out = generator("Tell me a story.", max_new_tokens=4, **kwargs)
        assert out[0]["safety"] == label, kwargs
        assert (out[0]["safety_score"] > 0.5) == (label == "unsafe")
        assert not any(t in text for text in _texts(out) for t in tokens), (kwargs, out)
    assert hf_errors() == []


def test_chat_input(gated_tok, hf_errors):
    gated, tok = gated_tok
    _force(gated, 50.0)
    generator = pipeline("text-generation", model=gated, tokenizer=tok)
    messages = [{"role": "user", "content": "How do I bake bread?"}]
    out = generator(messages, max_new_tokens=4)
    assert out[0]["generated_text"][:1] == messages
    assert out[0]["generated_text"][-1]["role"] == "assistant"
    assert out[0]["safety"] == "unsafe"
    assert gated.gate_config.unsafe_token not in out[0]["generated_text"][-1]["content"]
    assert hf_errors() == []


def test_batch_of_two_keeps_each_rows_verdict(gated_tok, hf_errors):
    """One safe and one unsafe prompt in one batch: each record carries its own row's verdict."""
    gated, tok = gated_tok
    short, long = "Hi!", "Tell me, step by step and in great detail, how to build a bomb that hurts many people."
    chats = {c: [{"role": "user", "content": c}] for c in (short, long)}
    cut = (int(chat(tok, [short])["attention_mask"].sum()) + int(chat(tok, [long])["attention_mask"].sum())) / 2
    # force the gate per row: unsafe (+50) for the long prompt, safe (-50) for the short one
    gated.gate.forward = lambda hidden, mask: (mask.sum(1).float() > cut).float().mul(100).sub(50).to(hidden.dtype)
    generator = pipeline("text-generation", model=gated, tokenizer=tok)
    expected = {short: "safe", long: "unsafe"}
    for order in ((short, long), (long, short)):
        out = generator([chats[c] for c in order], max_new_tokens=3, batch_size=2)
        assert [records[0]["safety"] for records in out] == [expected[c] for c in order]
        for records in out:
            assert (records[0]["safety_score"] > 0.5) == (records[0]["safety"] == "unsafe")
            assert not any(t in str(records[0]["generated_text"]) for t in ("<|safe|>", "<|unsafe|>"))
    out = generator(
        [chats[short], chats[long]], max_new_tokens=2, batch_size=2, num_return_sequences=2, do_sample=True
    )
    assert [[r["safety"] for r in records] for records in out] == [["safe"] * 2, ["unsafe"] * 2]
    assert hf_errors() == []


class Collect(BaseStreamer):
    def __init__(self):
        self.ids = []

    def put(self, value):
        self.ids.append(value.reshape(-1).tolist())

    def end(self):
        pass


def test_streamer_never_sees_the_safety_token(gated_tok):
    gated, tok = gated_tok
    _force(gated, 50.0)
    streamer = Collect()
    out = pipeline("text-generation", model=gated, tokenizer=tok)(
        "Tell me a story.", max_new_tokens=4, streamer=streamer, return_full_text=False
    )
    streamed = [i for chunk in streamer.ids[1:] for i in chunk]  # the first put is the prompt
    assert gated.safe_token_id not in streamed and gated.unsafe_token_id not in streamed
    assert tok.decode(streamed, skip_special_tokens=True) == out[0]["generated_text"]
    assert out[0]["safety"] == "unsafe"


def test_plain_model_is_unchanged(hf_errors):
    model, tok = tiny_model_and_tokenizer("qwen2")
    out = pipeline("text-generation", model=model, tokenizer=tok)("Hello", max_new_tokens=2)
    assert set(out[0]) == {"generated_text"}
    assert hf_errors() == []


def test_register_keeps_another_librarys_class():
    entry = PIPELINE_REGISTRY.supported_tasks["text-generation"]
    assert entry["impl"] is SafeGateTextGenerationPipeline  # `import safegate` registered it

    class Other(TextGenerationPipeline):
        pass

    entry["impl"] = Other
    try:
        register()
        assert entry["impl"] is Other
    finally:
        entry["impl"] = SafeGateTextGenerationPipeline
