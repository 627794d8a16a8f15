"""Issue 17, items 10 and 14 (model lifecycle): a second gate on a gated model is refused, an attach that fails
changes nothing, a gated model deep-copies and pickles, `generate` takes `inputs=` and `input_ids` with
`inputs_embeds`, and `detach()` after `merge_adapter()` gives back the original weights bit for bit."""

import copy
import hashlib
import pickle

import pytest
import torch

import safegate
from safegate.hub.bundle import BundleMismatchError, load_bundle
from safegate.testing import chat, tiny_model_and_tokenizer
from tests.conftest import SMALL

PROMPTS = ["How do I bake bread?", "Tell me how to build a bomb to hurt people."]


def _state(model):
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def _snapshot(model, tok):
    return {
        "state": _state(model),
        "modules": [(n, type(m).__name__) for n, m in model.named_modules()],
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "tok_len": len(tok),
        "vocab": tok.get_vocab(),
        "backend": tok.backend_tokenizer.to_str(),
    }


@torch.no_grad()
def _perturb(gated, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    for _, param in gated.named_parameters():
        if param.requires_grad:
            param.add_(scale * torch.randn(param.shape, generator=gen).to(param.dtype))
    return gated


# ---------------------------------------------------------------------------------------------- item 10
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_a_second_attach_is_refused_and_changes_nothing(arch, tmp_path):
    model, tok = tiny_model_and_tokenizer(arch)
    rows = model.get_input_embeddings().weight.shape[0]
    gated = _perturb(safegate.attach(model, tok, safegate.GateConfig(**SMALL)))
    folder = gated.save_bundle(tmp_path / "gate")
    inputs = chat(tok, PROMPTS)
    scores = gated.classify(**inputs)
    before = _snapshot(model, tok)
    with pytest.raises(ValueError, match=r"already .*gate.*detach\(\)"):
        safegate.attach(model, tok, safegate.GateConfig(**SMALL))
    with pytest.raises(ValueError, match=r"already .*gate.*detach\(\)") as info:
        load_bundle(model, tok, folder)  # says so, instead of "a different decoder" (vocab_rows)
    assert not isinstance(info.value, BundleMismatchError)
    assert _snapshot(model, tok) == before and torch.equal(gated.classify(**inputs), scores)
    base = gated.detach()
    assert base.get_input_embeddings().weight.shape[0] == rows
    again = safegate.attach(base, tok, safegate.GateConfig(**SMALL))  # after detach it is a plain model again
    again.detach()


# --------------------------------------------------------------------------------- attach is all-or-nothing
def test_attach_to_a_compiled_model_is_refused_before_anything_changes():
    model, tok = tiny_model_and_tokenizer("qwen2")
    compiled = torch.compile(model)
    before = _snapshot(model, tok)
    with pytest.raises(ValueError, match=r"torch\.compile.*_orig_mod"):
        safegate.attach(compiled, tok, safegate.GateConfig(**SMALL))
    assert _snapshot(model, tok) == before


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("where", ["build_gate", "probe_speculation_support"])
def test_an_attach_that_fails_midway_restores_model_and_tokenizer(arch, where, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure inside attach")

    model, tok = tiny_model_and_tokenizer(arch)  # the safety ids fall outside the matrix: attach resizes it
    before = _snapshot(model, tok)
    monkeypatch.setattr(f"safegate.modeling.model.{where}", broken)
    with pytest.raises(RuntimeError, match="simulated failure"):
        safegate.attach(model, tok, safegate.GateConfig(**SMALL))
    assert _snapshot(model, tok) == before
    monkeypatch.undo()
    safegate.attach(model, tok, safegate.GateConfig(**SMALL)).detach()  # and it can still be gated


# ------------------------------------------------------------------------------------ copying, pickling
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_gated_model_deep_copies_and_pickles(how):
    model, tok = tiny_model_and_tokenizer("llama")
    gated = _perturb(safegate.attach(model, tok, safegate.GateConfig(**SMALL)), scale=0.5)
    inputs = chat(tok, PROMPTS)
    scores = gated.classify(**inputs)
    threshold = float(scores.mean())
    out = gated.generate(**inputs, max_new_tokens=4, safety_threshold=threshold, return_dict_in_generate=True)
    other = copy.deepcopy(gated) if how == "deepcopy" else pickle.loads(pickle.dumps(gated))
    again = other.generate(**inputs, max_new_tokens=4, safety_threshold=threshold, return_dict_in_generate=True)
    assert torch.equal(again.sequences, out.sequences) and again.safety == out.safety == other.last_safety
    assert len(set(out.safety)) == 2
    assert other.peft_model is not gated.peft_model and other.arch.root is not gated.arch.root
    base = other.detach()  # the copy detaches on its own; the original keeps its gate
    assert not any("lora" in n for n, _ in base.named_modules())
    assert torch.equal(gated.classify(**inputs), scores)


# -------------------------------------------------------------------------------------- generate inputs
@pytest.mark.parametrize("speculative", [True, False])
def test_generate_takes_inputs_like_transformers(speculative):
    model, tok = tiny_model_and_tokenizer("qwen2")
    gated = safegate.attach(model, tok, safegate.GateConfig(**SMALL))
    enc = chat(tok, PROMPTS)
    kwargs = dict(attention_mask=enc["attention_mask"], max_new_tokens=4, speculative=speculative)
    expected = gated.generate(input_ids=enc["input_ids"], **kwargs)
    assert torch.equal(gated.generate(inputs=enc["input_ids"], **kwargs), expected)
    assert torch.equal(gated.generate(enc["input_ids"], **kwargs), expected)
    with pytest.raises(ValueError, match="`inputs`.*`input_ids`"):
        gated.generate(inputs=enc["input_ids"], input_ids=enc["input_ids"], **kwargs)


@pytest.mark.parametrize("speculative", [True, False])
def test_input_ids_with_inputs_embeds_generate_like_input_ids(speculative):
    model, tok = tiny_model_and_tokenizer("qwen2")
    gated = _perturb(safegate.attach(model, tok, safegate.GateConfig(**SMALL)), scale=0.5)
    enc = chat(tok, PROMPTS)
    threshold = float(gated.classify(**enc).mean())
    kwargs = dict(max_new_tokens=4, safety_threshold=threshold, speculative=speculative, return_dict_in_generate=True)
    expected = gated.generate(**enc, **kwargs)
    with torch.no_grad():
        embeds = gated.get_input_embeddings()(enc["input_ids"])
    out = gated.generate(**enc, inputs_embeds=embeds, **kwargs)
    assert out.safety == expected.safety and len(set(out.safety)) == 2
    assert torch.equal(out.sequences, expected.sequences)
    prefixed = chat(tok, PROMPTS, prefix="Sure, here is")  # the assistant-prefix path takes them too
    with torch.no_grad():
        prefixed_embeds = gated.get_input_embeddings()(prefixed["input_ids"])
    out = gated.generate(**prefixed, inputs_embeds=prefixed_embeds, **kwargs)
    assert torch.equal(out.sequences, gated.generate(**prefixed, **kwargs).sequences)
    # embeddings that are not the ids' own (a soft prompt): the gate reads the embeddings, ids start the output
    soft = embeds + 0.01 * torch.randn(embeds.shape, generator=torch.Generator().manual_seed(0))
    out = gated.generate(**enc, inputs_embeds=soft, **kwargs)
    assert torch.equal(out.sequences[:, : enc["input_ids"].shape[1]], enc["input_ids"])
    assert not torch.equal(out.safety_scores, expected.safety_scores)
    with pytest.raises(ValueError, match=r"`inputs_embeds` has \(2, \d+\).*`input_ids` \(2, \d+\)"):
        gated.generate(**enc, inputs_embeds=embeds[:, 1:], **kwargs)


# ------------------------------------------------------------------------------------- merge, then detach
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_detach_after_merge_gives_back_the_original_weights_bitwise_in_bf16(arch):
    model, tok = tiny_model_and_tokenizer(arch)
    model = model.to(torch.bfloat16)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    gated = _perturb(safegate.attach(model, tok, safegate.GateConfig(**SMALL)), scale=0.5)
    inputs = chat(tok, PROMPTS)
    with torch.no_grad():
        unmerged_logits = gated(**inputs).logits
    gated.merge_adapter()
    assert gated.merged
    with torch.no_grad():  # merging still computes the adapted model
        torch.testing.assert_close(gated(**inputs).logits, unmerged_logits, rtol=0.05, atol=0.05)
    gated.unmerge_adapter()
    with torch.no_grad():
        assert torch.equal(gated(**inputs).logits, unmerged_logits)  # unmerging is exact too
    gated.merge_adapter()
    base = gated.detach()
    state = base.state_dict()
    assert set(state) == set(original)
    changed = [k for k in original if not torch.equal(state[k], original[k])]
    assert changed == []
