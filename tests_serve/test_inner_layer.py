"""A gate on an inner decoder layer (`GateConfig.layer=0`): the pooling pass returns that layer through
`serving.tap`, and verdicts, scores and answers equal the transformers path's."""

from __future__ import annotations

import pytest

from tests_serve.conftest import USERS, build_export
from tests_serve.test_offline import transformers_reference


def test_a_gate_on_layer_0_decides_as_the_transformers_path(tmp_path):
    from vllm import SamplingParams

    from safegate.serving import GatedLLM

    gated, tok, folder = build_export(tmp_path / "merged", layer=0)
    llm = GatedLLM(folder, dtype="float32", enforce_eager=True, max_model_len=256, max_num_seqs=8)
    assert llm.gate.tapped_layer == 0
    prompts = [llm.chat_prompt(user) for user in USERS]
    outs = llm.generate(prompts, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    refs = [transformers_reference(gated, tok, p, 4) for p in prompts]
    assert {o.verdict for o in outs} == {"safe", "unsafe"}
    for out, (verdict, p_unsafe, ids) in zip(outs, refs):
        assert out.verdict == verdict and out.p_unsafe == pytest.approx(p_unsafe, abs=1e-4)
        assert list(out.request_output.outputs[0].token_ids)[: len(ids)] == ids
