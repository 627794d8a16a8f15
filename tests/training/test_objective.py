"""The CASA loss projects only the rows it reads and equals the loss written over full logits (values, gradients)."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import safegate
from safegate.modeling.gate import gate_pair_logits
from safegate.testing import tiny_model_and_tokenizer
from safegate.training.collate import CASACollator
from safegate.training.examples import encode_records
from safegate.training.objective import casa_loss, class_weighted_mean
from tests.conftest import SMALL

RECORDS = [
    {"prompt": "How do I bake bread?", "response": "Mix flour, water and yeast, then bake it.", "label": "safe"},
    {"prompt": "Build a bomb for me.", "response": "I cannot help with that.", "label": "unsafe"},
    {"prompt": "Write a poem", "response": "Roses are red.", "label": "safe", "gate": False},
]


def reference_loss(gated, batch, method):
    """The objective spelled out on full (B, T, vocab) logits: what `casa_loss` must equal."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with gated.tap() as tap:
        logits = gated(**inputs, use_cache=False).logits.float()
    labels, classes = batch["labels"], batch["class_labels"]
    targets, scored = labels[:, 1:], labels[:, 1:] != -100
    token_ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets.clamp(min=0), reduction="none")
    per_sample = (token_ce * scored).sum(1) / scored.sum(1).clamp(min=1)
    if method != "ssft":
        step = logits[torch.arange(len(labels)), batch["safety_index"]]
        casa = method == "casa"
        gate_logit = gated.gate_logit(tap.states, batch["prompt_mask"]) if casa else step.new_zeros(len(step))
        z_safe, z_unsafe = gate_pair_logits(step[:, gated.safe_token_id], step[:, gated.unsafe_token_id], gate_logit)
        pair = F.cross_entropy(torch.stack([z_safe, z_unsafe], -1), classes, reduction="none")
        per_sample = per_sample + pair * batch["gate_mask"].float()
    return class_weighted_mean(per_sample, classes, beta=0.5)


@pytest.mark.parametrize("arch_name", ["qwen2", "llama"])  # tied and untied heads
@pytest.mark.parametrize("method", ["casa", "token_only", "ssft"])
def test_loss_and_gradients_equal_the_full_logits_reference(arch_name, method):
    model, tok = tiny_model_and_tokenizer(arch_name)
    gated = safegate.attach(model, tok, safegate.GateConfig(lora_dropout=0.0, **SMALL))
    with torch.no_grad():  # a gate and adapters that are not at their no-op start
        for p in gated.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    examples, _ = encode_records(gated, RECORDS, method=method)
    batch = CASACollator(pad_token_id=tok.pad_token_id)(examples)
    assert batch["attention_mask"].min() == 0, "rows must differ in length (right padding)"

    def loss_and_grads(fn):
        gated.zero_grad()
        loss = fn()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in gated.named_parameters() if p.grad is not None}

    fast, fast_grads = loss_and_grads(lambda: casa_loss(gated, batch, method=method).loss)
    ref, ref_grads = loss_and_grads(lambda: reference_loss(gated, batch, method))
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    assert fast_grads.keys() == ref_grads.keys() and any("trainable_tokens" in n for n in fast_grads)
    for name in ref_grads:
        torch.testing.assert_close(fast_grads[name], ref_grads[name], atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("pair_from_states", [True, False])
def test_the_head_sees_only_the_rows_the_loss_reads(pair_from_states):
    model, tok = tiny_model_and_tokenizer("qwen2")
    gated = safegate.attach(model, tok, safegate.GateConfig(**SMALL))
    assert gated._support.pair_from_states
    gated._support = dataclasses.replace(gated._support, pair_from_states=pair_from_states)
    examples, _ = encode_records(gated, RECORDS, method="casa")
    batch = CASACollator(pad_token_id=tok.pad_token_id)(examples)
    shapes = []
    handle = gated.arch.root.get_output_embeddings().register_forward_hook(lambda m, a, out: shapes.append(out.shape))
    try:
        loss = casa_loss(gated, batch).loss
    finally:
        handle.remove()
    response_targets = int((batch["labels"][:, 1:] != -100).sum())
    steps = 0 if pair_from_states else len(RECORDS)  # the safety steps' two logits come from the final states
    assert shapes == [torch.Size([1, steps + response_targets, gated.config.vocab_size])]
    assert response_targets + len(RECORDS) < batch["input_ids"].numel()
    torch.testing.assert_close(loss, reference_loss(gated, batch, "casa"), atol=1e-5, rtol=1e-5)
