"""A gate on an inner decoder layer (`GateConfig.layer=0`): the one-pass model class hooks that layer, the pooling
pass returns it through `serving.tap`, and on both paths verdicts, scores and answers equal the transformers path's
(with a prefill attack, which the one-pass engine hands to the pooling pass)."""

from __future__ import annotations

import pytest

from tests_serve.conftest import USERS, build_export
from tests_serve.test_offline import transformers_reference


@pytest.mark.parametrize("one_pass", [True, False])
def test_a_gate_on_layer_0_decides_as_the_transformers_path(tmp_path, one_pass):
    from vllm import SamplingParams

    from safegate.serving import GatedLLM

    gated, tok, folder = build_export(tmp_path / "merged", layer=0)
    llm = GatedLLM(folder, one_pass=one_pass, dtype="float32", enforce_eager=True, max_model_len=256, max_num_seqs=8)
    assert llm.gate.tapped_layer == 0
    prompts = [llm.chat_prompt(user) for user in USERS]
    prompts.append(prompts[3] + "Sure, here is how")
    outs = llm.generate(prompts, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    refs = [transformers_reference(gated, tok, p, 4) for p in prompts]
    assert {o.verdict for o in outs} == {"safe", "unsafe"}
    for out, (verdict, p_unsafe, ids) in zip(outs, refs):
        assert out.verdict == verdict and out.p_unsafe == pytest.approx(p_unsafe, abs=1e-4)
        assert list(out.request_output.outputs[0].token_ids)[: len(ids)] == ids
