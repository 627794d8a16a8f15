"""The one-pass path on the engine (`serving.one_pass`): sampling, penalties, biases and a caller's `extra_args`
cannot change the decided token; logprobs, `n` and the threshold argument work as on the two-pass path."""

from __future__ import annotations

import pytest

from tests_serve.conftest import USERS

one_pass_only = pytest.mark.parametrize("gated_llm", ["one-pass"], indirect=True)


@one_pass_only
def test_sampling_penalties_biases_and_extra_args_cannot_change_the_verdict(gated_and_export, gated_llm):
    from vllm import SamplingParams

    gated, _, _ = gated_and_export
    safety = [gated.safe_token_id, gated.unsafe_token_id]
    prompts = [gated_llm.chat_prompt(user) for user in USERS]
    greedy = gated_llm.generate(prompts, SamplingParams(max_tokens=3, temperature=0))
    assert {o.verdict for o in greedy} == {"safe", "unsafe"}
    hostile = [
        SamplingParams(max_tokens=3, temperature=1.5, top_p=0.5, top_k=3, seed=0, repetition_penalty=1.5),
        SamplingParams(max_tokens=3, temperature=0, logit_bias={safety[0]: -100.0, safety[1]: 100.0}),
        SamplingParams(max_tokens=3, temperature=0, logit_bias={safety[0]: 100.0, safety[1]: -100.0}),
        SamplingParams(max_tokens=3, temperature=0, allowed_token_ids=[5, 6, 7]),
        SamplingParams(max_tokens=3, temperature=0, extra_args={"safegate_threshold": 0.0}),  # a caller's own
        SamplingParams(max_tokens=3, temperature=0, min_tokens=3, presence_penalty=2.0, frequency_penalty=2.0),
    ]
    for params in hostile:
        outs = gated_llm.generate(prompts, params)
        assert [(o.verdict, o.p_unsafe) for o in outs] == [(o.verdict, pytest.approx(o.p_unsafe)) for o in greedy]
        for out in outs:
            assert not set(safety) & set(out.request_output.outputs[0].token_ids)


@one_pass_only
def test_logprobs_n_and_max_tokens_count_the_answer_alone(gated_and_export, gated_llm):
    from vllm import SamplingParams

    gated, _, _ = gated_and_export
    prompts = [gated_llm.chat_prompt(user) for user in USERS[:2]]
    params = SamplingParams(n=2, max_tokens=4, temperature=1.0, seed=1, logprobs=2, ignore_eos=True)
    for out in gated_llm.generate(prompts, params):
        assert len(out.request_output.outputs) == 2
        for completion in out.request_output.outputs:
            ids = list(completion.token_ids)
            assert len(ids) == 4 and len(completion.logprobs) == 4
            assert not {gated.safe_token_id, gated.unsafe_token_id} & set(ids)
            sampled = sum(entry[token].logprob for entry, token in zip(completion.logprobs, ids))
            assert completion.cumulative_logprob == pytest.approx(sampled, abs=1e-4)
    plain = gated_llm.generate(prompts, SamplingParams(max_tokens=2, temperature=0))
    assert all(o.request_output.outputs[0].logprobs is None for o in plain)  # not asked for: not returned


@one_pass_only
def test_the_threshold_argument_decides_as_the_two_pass_path(gated_llm):
    prompts = [gated_llm.chat_prompt(user) for user in USERS]
    scores = sorted(o.p_unsafe for o in gated_llm.classify(prompts))
    threshold = (scores[0] + scores[1]) / 2  # one prompt below, three above
    outs = gated_llm.classify(prompts, threshold=threshold)
    assert [o.verdict for o in outs] == ["unsafe" if o.p_unsafe >= threshold else "safe" for o in outs]
    assert sum(o.verdict == "unsafe" for o in outs) == 3
    two_pass = gated_llm.decide([gated_llm.plan(p) for p in prompts], threshold)
    assert [(o.verdict, pytest.approx(o.p_unsafe, abs=1e-5)) for o in outs] == two_pass
