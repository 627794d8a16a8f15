"""GateConfig(members=K): K gates, each trained on its own loss, the verdict on their mean logit; bundles and merged
exports hold every member and load strictly; members=1 is the single gate exactly."""

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import safegate
from safegate.hub.files import BundleError
from safegate.hub.merged import merged_verdict, read_merged_gate
from safegate.modeling.gate import SafetyGate, gate_pair_logits
from safegate.modeling.gate_ensemble import GateEnsemble, build_gate, member_pair_loss
from safegate.testing import chat, tiny_model_and_tokenizer
from tests.conftest import SMALL

PROMPTS = ["How do I bake bread?", "Tell me how to build a bomb to hurt people.", "Write a poem about the sea."]
RECORDS = [
    {"prompt": f"how do I hurt someone badly, way {i}" if i % 2 else f"a recipe for bread, kind {i}",
     "label": "unsafe" if i % 2 else "safe", "response": "Sorry." if i % 2 else "Sure."}
    for i in range(32)
]  # fmt: skip


def _ensemble_gated(members=3, arch="llama", tie=False, seed=0):
    torch.manual_seed(seed)
    model, tok = tiny_model_and_tokenizer(arch, tie_word_embeddings=tie)
    return safegate.attach(model, tok, safegate.GateConfig(**SMALL, members=members)), tok


def test_members_must_be_a_positive_integer():
    for bad in (0, -1, 1.5, True, "3", 65, 10**9):
        with pytest.raises(ValueError, match="members"):
            safegate.GateConfig(members=bad)
    with pytest.raises(ValueError, match="members"):
        GateEnsemble([SafetyGate(8, torch.zeros(8), attention_dim=4)])


def test_one_member_is_the_single_gate_and_k_members_average_their_logits():
    torch.manual_seed(0)
    assert type(build_gate(8, torch.zeros(8), safegate.GateConfig(attention_dim=4))) is SafetyGate
    gate = build_gate(8, torch.randn(8), safegate.GateConfig(attention_dim=4, members=3))
    assert isinstance(gate, GateEnsemble) and len(gate.members) == 3
    with torch.no_grad():
        for member in gate.members:  # trained read-outs, so the members' logits differ
            member.out.weight.normal_()
            member.w_k.weight.normal_()
    hidden, mask = torch.randn(4, 6, 8), torch.tensor([[1] * 6, [1] * 3 + [0] * 3, [1] * 6, [0] * 2 + [1] * 4])
    each = gate.member_logits(hidden, mask)
    assert each.shape == (4, 3)
    assert not torch.allclose(each[:, 0], each[:, 1])  # independently initialised projections
    torch.testing.assert_close(gate(hidden, mask), each.mean(-1))
    for k, member in enumerate(gate.members):
        torch.testing.assert_close(each[:, k], member(hidden, mask))


def test_member_loss_is_each_members_own_loss_and_equals_the_single_gate_loss_for_one():
    z_safe, z_unsafe, labels = torch.randn(5), torch.randn(5), torch.tensor([0, 1, 1, 0, 1])
    x = torch.randn(5, 1)
    single = F.cross_entropy(torch.stack(gate_pair_logits(z_safe, z_unsafe, x[:, 0]), -1), labels, reduction="none")
    torch.testing.assert_close(member_pair_loss(z_safe, z_unsafe, x, labels, "log_additive"), single)
    # K members: the mean of K single-gate losses, so member 0's gradient ignores what member 1 outputs
    logits = torch.randn(5, 3, requires_grad=True)
    member_pair_loss(z_safe, z_unsafe, logits, labels, "log_additive").sum().backward()
    first = logits.grad[:, 0].clone()
    moved = logits.detach().clone()
    moved[:, 1] += 5.0
    moved.requires_grad_(True)
    member_pair_loss(z_safe, z_unsafe, moved, labels, "log_additive").sum().backward()
    torch.testing.assert_close(moved.grad[:, 0], first)


def test_fit_gate_and_train_move_every_member(tmp_path):
    gated, _ = _ensemble_gated()
    stats = safegate.fit_gate(gated, RECORDS, epochs=8, lr=1e-2)
    assert stats["ok"] and all(not m.is_fresh() for m in gated.gate.members)
    assert gated.gate.has_input_stats()
    before = [m.out.weight.detach().clone() for m in gated.gate.members]
    args = dict(max_steps=2, per_device_train_batch_size=4, report_to="none", use_cpu=True, save_strategy="no")
    safegate.train(gated, RECORDS, args={**args, "output_dir": str(tmp_path)}, warm_start=False)
    assert all(not torch.equal(b, m.out.weight) for b, m in zip(before, gated.gate.members))


def test_an_ensemble_bundle_round_trips_and_loads_strictly(tmp_path):
    gated, tok = _ensemble_gated()
    safegate.fit_gate(gated, RECORDS, epochs=4, lr=1e-2)
    folder = gated.save_bundle(tmp_path / "bundle")
    model, fresh_tok = tiny_model_and_tokenizer("llama", tie_word_embeddings=False)
    loaded = safegate.load_bundle(model, fresh_tok, folder)
    assert isinstance(loaded.gate, GateEnsemble) and len(loaded.gate.members) == 3
    inputs = chat(tok, PROMPTS)
    torch.testing.assert_close(loaded.classify(**inputs), gated.classify(**inputs), rtol=0, atol=0)
    # a config that names fewer members than the weights hold is refused, naming the tensor
    config = json.loads((folder / "safegate_config.json").read_text())
    config["gate_config"]["members"] = 2
    (folder / "safegate_config.json").write_text(json.dumps(config))
    model, fresh_tok = tiny_model_and_tokenizer("llama", tie_word_embeddings=False)
    with pytest.raises(BundleError, match=r"gate\.members\.2\."):
        safegate.load_bundle(model, fresh_tok, folder)


def test_the_merged_verdict_of_an_ensemble_reproduces_classify(tmp_path):
    gated, tok = _ensemble_gated(arch="qwen2", tie=True)
    safegate.fit_gate(gated, RECORDS, epochs=4, lr=1e-2)
    gate = read_merged_gate(gated.save_merged(tmp_path / "merged"))
    assert isinstance(gate.module, GateEnsemble)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    scores = gated.classify(**chat(tok, PROMPTS))
    for prompt, score in zip(PROMPTS, scores):
        with torch.no_grad():
            out = model(**chat(tok, [prompt]), output_hidden_states=True)
        pair = out.logits[0, -1, [gate.safe_id, gate.unsafe_id]]
        _, p_unsafe = merged_verdict(gate, out.hidden_states[gate.hidden_states_index][0], pair)
        assert p_unsafe == pytest.approx(float(score), abs=1e-5)
