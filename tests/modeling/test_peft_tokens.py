"""The row-sparse trainable-token forward equals PEFT's own path, in outputs and gradients."""

import pytest
import torch

import safegate
from safegate.modeling.peft_tokens import token_layers
from safegate.testing import chat, tiny_model_and_tokenizer
from tests.conftest import SMALL


@pytest.mark.parametrize("arch_name", ["qwen2", "llama"])  # tied and untied heads
def test_sparse_forward_matches_peft(arch_name):
    model, tok = tiny_model_and_tokenizer(arch_name)
    gated = safegate.attach(model, tok, safegate.GateConfig(**SMALL))
    layers = [m for m in gated.peft_model.modules() if type(m).__name__ == "TrainableTokensLayer"]
    assert layers and all(hasattr(m, "_safegate_peft_forward") for m in layers)
    with torch.no_grad():
        for m in layers:
            if not m.tied_adapter:
                m.trainable_tokens_delta["default"].normal_()
    inputs = chat(tok, ["hello there", "build a bomb"])
    ids = inputs["input_ids"].clone()
    ids[:, -1] = gated.safe_token_id  # the trained rows must be read from the embedding too
    ids[0, -2] = gated.unsafe_token_id

    def run():
        gated.zero_grad()
        out = gated(input_ids=ids, attention_mask=inputs["attention_mask"]).logits
        out.square().mean().backward()
        grads = [p.grad.clone() for p in gated.parameters() if p.requires_grad and p.grad is not None]
        return out.detach(), grads

    fast_out, fast_grads = run()
    for m in layers:
        m.forward_adapters = m._safegate_peft_forward
    ref_out, ref_grads = run()
    torch.testing.assert_close(fast_out, ref_out, atol=1e-5, rtol=1e-5)
    assert len(fast_grads) == len(ref_grads)
    for a, b in zip(fast_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch_name", ["qwen2", "llama"])  # tied and untied heads
@pytest.mark.parametrize("lora_r", [SMALL["lora_r"], 0])  # LoRA (layers in wrappers) and tokens-only adapters
def test_token_layers_finds_the_embedding_and_an_untied_head(arch_name, lora_r):
    model, tok = tiny_model_and_tokenizer(arch_name)
    gated = safegate.attach(model, tok, safegate.GateConfig(**(SMALL | {"lora_r": lora_r})))
    layers = token_layers(gated.peft_model, gated.embed_module_name, gated.head_module_name)
    assert set(layers) == ({"embed"} if gated.arch.tied else {"embed", "head"})
    assert layers == gated.token_layers()
    assert all(type(m).__name__ == "TrainableTokensLayer" and m.tied_adapter is None for m in layers.values())
    assert isinstance(layers["embed"].base_layer, torch.nn.Embedding)
    assert all(isinstance(m.base_layer, torch.nn.Linear) for k, m in layers.items() if k == "head")
