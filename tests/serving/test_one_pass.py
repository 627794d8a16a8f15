"""One-pass verdicts (`serving.one_pass`, `serving.forced_token`) without vLLM: the gate computed from a flattened
batch as vLLM's forward sees it equals `classify`; the logits the sampler gets; the forced token; the output strip;
the settings refused. The engine end to end is in `tests_serve` (`make test-serve`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from safegate.errors import CLIError
from safegate.hub.merged import decide_pair
from safegate.serving import one_pass
from safegate.serving.cli import one_pass_flags
from safegate.serving.forced_token import (
    THRESHOLD_KEY,
    SafetyTokenStrip,
    UngatedOutput,
    force_decided_tokens,
    one_pass_params,
    threshold_state,
)
from safegate.serving.one_pass import PENDING, OnePassGate, check_one_pass_config
from safegate.testing import chat
from tests.hub.test_merged import PROMPTS, _trained


@pytest.mark.parametrize("layer", [-1, 0])
def test_the_gate_on_a_flattened_batch_equals_classify(tmp_path, monkeypatch, layer):
    gated, tok = _trained("llama", False, layer=layer)
    folder = gated.save_merged(tmp_path / "merged")
    model = AutoModelForCausalLM.from_pretrained(folder)  # what the engine runs
    gate = OnePassGate(folder, model)
    ids, tapped, final = [], [], []
    for prompt in PROMPTS:
        with torch.no_grad():
            out = model(**chat(tok, [prompt]), output_hidden_states=True)
        ids.append(chat(tok, [prompt])["input_ids"][0])
        tapped.append(out.hidden_states[gate.gate.hidden_states_index][0])
        final.append(out.hidden_states[-1][0])
    # the step's requests: prompt 0 whole, a decode row, prompt 1 whole, prompt 2 with a safety id (the two-pass
    # path's generation prompt), the first chunk of a longer prompt (query 3 of sequence 8)
    injected = torch.cat([ids[2][:-1], torch.tensor([gated.safe_token_id])])
    rows = [(ids[0], tapped[0], final[0], len(ids[0])), (ids[1][:1], tapped[1][:1], final[1][:1], 9),
            (ids[1], tapped[1], final[1], len(ids[1])), (injected, tapped[2], final[2], len(injected)),
            (ids[2][:3], tapped[2][:3], final[2][:3], 8)]  # fmt: skip
    lengths = torch.tensor([len(r[0]) for r in rows])
    meta = SimpleNamespace(query_start_loc=torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]),
                           seq_lens=torch.tensor([r[3] for r in rows]))  # fmt: skip
    monkeypatch.setattr(one_pass, "attention_metadata", lambda: meta)
    if layer != -1:
        gate.kept["states"] = torch.cat([r[1] for r in rows])  # what the layer hook keeps in the engine's forward
    gate.observe(torch.cat([r[0] for r in rows]), torch.cat([r[2] for r in rows]))
    assert PENDING.rows == 5 and sorted(PENDING.pairs) == [0, 2]
    scores = gated.classify(**chat(tok, PROMPTS[:2]))
    for row, score in zip([0, 2], scores):
        assert decide_pair(*map(torch.tensor, PENDING.pairs[row]), None)[1] == pytest.approx(float(score), abs=1e-5)

    logits = gate.rewrite(torch.randn(5, model.config.vocab_size, dtype=torch.bfloat16))
    assert logits.dtype == torch.float32
    safety = [gated.safe_token_id, gated.unsafe_token_id]
    for row in range(5):
        finite = torch.isfinite(logits[row]).nonzero().flatten().tolist()
        if row in PENDING.pairs:  # only the pair: the raw logprob of the sampled token is log p(safe | unsafe)
            assert finite == safety
            p_unsafe = logits[row].log_softmax(-1)[safety[1]].exp()
            assert float(p_unsafe) == pytest.approx(float(scores[[0, 2].index(row)]), abs=1e-5)
        else:  # an answer row never holds a safety token
            assert len(finite) == model.config.vocab_size - 2 and not set(safety) & set(finite)
    fewer = gate.rewrite(torch.zeros(3, model.config.vocab_size))  # not this step's rows (prompt logprobs)
    assert torch.isinf(fewer[:, safety]).all() and torch.isfinite(fewer[:, :-2]).all()


def test_observe_without_metadata_leaves_nothing_pending(tmp_path, monkeypatch):
    gated, _ = _trained("llama", False)
    gate = OnePassGate(gated.save_merged(tmp_path / "merged"), torch.nn.Module())
    PENDING.pairs, PENDING.rows = {0: (0.0, 0.0)}, 1
    monkeypatch.setattr(one_pass, "attention_metadata", lambda: None)
    gate.observe(torch.tensor([1, 2]), torch.zeros(2, gate.gate.hidden_size))
    assert PENDING.pairs == {} and PENDING.rows == -1


def test_forced_rows_are_one_hot_on_the_token_the_threshold_decides():
    safety = (4, 5)
    pairs = {0: (0.0, 0.0), 1: (0.0, -1.0), 2: (0.0, -1.0), 3: (float("nan"), 0.0)}  # p = .5, .27, .27, nan
    logits = force_decided_tokens(torch.zeros(5, 6), pairs, {2: (0.2,)}, safety, None)
    decided = [int(row.argmax()) for row in logits[:4]]
    assert decided == [5, 4, 5, 5]  # tie -> unsafe; argmax; the request's threshold 0.2; NaN fails closed
    assert all(int(torch.isfinite(row).sum()) == 1 for row in logits[:4]) and torch.isfinite(logits[4]).all()
    default = force_decided_tokens(torch.zeros(2, 6), {0: (0.0, -1.0)}, {}, safety, 0.2)
    assert int(default[0].argmax()) == 5  # the export's default threshold when the request names none


def test_the_threshold_travels_in_extra_args_and_the_caller_cannot_choose_it():
    @dataclass
    class Params:  # the fields of vLLM's SamplingParams that one_pass_params touches
        max_tokens: int | None = 8
        min_tokens: int = 0
        logprobs: int | None = None
        extra_args: dict | None = field(default_factory=lambda: {THRESHOLD_KEY: 1.0, "other": 1})

        def clone(self):
            return replace(self, extra_args=dict(self.extra_args or {}))

    params = Params()
    out = one_pass_params(params, 0.3)
    assert (out.max_tokens, out.min_tokens, out.logprobs) == (9, 0, 0)
    assert out.extra_args == {THRESHOLD_KEY: 0.3, "other": 1} and params.extra_args[THRESHOLD_KEY] == 1.0
    assert one_pass_params(Params(None, 2, 3, None), None).__dict__ == {
        "max_tokens": None, "min_tokens": 3, "logprobs": 3, "extra_args": {THRESHOLD_KEY: None}}  # fmt: skip
    assert threshold_state(out) == (0.3,) and threshold_state(Params(extra_args=None)) is None
    with pytest.raises(ValueError, match="safegate_threshold"):
        threshold_state(Params(extra_args={THRESHOLD_KEY: 1.5}))


def _completion(ids, text, logprobs=None, index=0, finish=None):
    entries = None if logprobs is None else [{i: SimpleNamespace(logprob=lp)} for i, lp in zip(ids, logprobs)]
    total = None if logprobs is None else sum(logprobs)
    return SimpleNamespace(index=index, token_ids=list(ids), text=text, logprobs=entries, cumulative_logprob=total,
                           finish_reason=finish)  # fmt: skip


def test_the_strip_takes_the_token_off_and_reads_the_verdict():
    lp = math.log(0.7)
    strip = SafetyTokenStrip((4, 5), ("<|safe|>", "<|unsafe|>"), cumulative=False, keep_logprobs=True)
    first = strip(SimpleNamespace(outputs=[_completion([5, 9], "<|unsafe|>No", [lp, -0.5])]))
    assert strip.verdict == ("unsafe", pytest.approx(0.7))
    (c,) = first.outputs
    assert (c.token_ids, c.text, len(c.logprobs), c.cumulative_logprob) == ([9], "No", 1, pytest.approx(-0.5))
    later = strip(SimpleNamespace(outputs=[_completion([4], "x", [-0.1])]))  # a delta: not the first token
    assert later.outputs[0].token_ids == [4] and strip.verdict[0] == "unsafe"

    safe = SafetyTokenStrip((4, 5), ("<|safe|>", "<|unsafe|>"), cumulative=True, keep_logprobs=False)
    for _ in range(2):  # cumulative outputs repeat the token every time
        out = safe(SimpleNamespace(outputs=[_completion([4, 7, 8], "Sure", [math.log(0.9), -1, -1])]))
        assert out.outputs[0].token_ids == [7, 8] and out.outputs[0].logprobs is None
    assert safe.verdict == ("safe", pytest.approx(0.1))
    with pytest.raises(UngatedOutput, match="not a safety token"):
        safe(SimpleNamespace(outputs=[_completion([7, 8], "Sure", [-1, -1])]))
    with pytest.raises(UngatedOutput, match="finished before"):
        aborted = SimpleNamespace(outputs=[_completion([], "", finish="abort")])
        SafetyTokenStrip((4, 5), ("a", "b"), True, False)(aborted)


def test_settings_that_break_exact_one_pass_verdicts_are_refused(monkeypatch):
    def config(**changes):
        base = dict(chunked=False, caching=False, spec=None, mode="raw_logprobs", pp=1, device="cpu")
        c = base | changes
        return SimpleNamespace(
            device_config=SimpleNamespace(device_type=c["device"]),
            scheduler_config=SimpleNamespace(enable_chunked_prefill=c["chunked"]),
            cache_config=SimpleNamespace(enable_prefix_caching=c["caching"]), speculative_config=c["spec"],
            model_config=SimpleNamespace(logprobs_mode=c["mode"]),
            parallel_config=SimpleNamespace(pipeline_parallel_size=c["pp"]),
        )  # fmt: skip

    check_one_pass_config(config(), -1)
    check_one_pass_config(config(pp=2), -1)
    refused = [({"chunked": True}, "chunked prefill"), ({"caching": True}, "prefix caching"),
               ({"spec": object()}, "speculative"), ({"mode": "processed_logprobs"}, "logprobs_mode")]  # fmt: skip
    for changes, message in refused:
        with pytest.raises(ValueError, match=message):
            check_one_pass_config(config(**changes), -1)
    with pytest.raises(ValueError, match="one pipeline stage"):
        check_one_pass_config(config(pp=2), 0)
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    with pytest.raises(ValueError, match="VLLM_USE_V2_MODEL_RUNNER=0"):
        check_one_pass_config(config(device="cuda"), -1)
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")
    check_one_pass_config(config(device="cuda"), -1)


def test_the_serve_command_owns_the_one_pass_flags():
    flags = one_pass_flags("Qwen2ForCausalLM", ["--port", "1"])
    assert flags[:2] == ["--hf-overrides", '{"architectures": ["SafegateQwen2ForCausalLM"]}']
    assert "--no-enable-prefix-caching" in flags and "--no-enable-chunked-prefill" in flags
    for taken in (["--enable-prefix-caching"], ["--hf-overrides={}"], ["--no-enable-chunked-prefill"]):
        with pytest.raises(CLIError, match="--two-pass"):
            one_pass_flags("Qwen2ForCausalLM", taken)
