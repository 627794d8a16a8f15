"""Issue 17 item 15: SafeCoDe on every image-capable architecture, with images, with each kind of judge."""

import functools

import pytest
import torch

from safegate.defenses import SafeCoDe
from safegate.defenses.judges import HFSafetyJudge, JudgeRequest, Verdict, verdict_prompt
from safegate.testing import tiny_model_and_tokenizer
from safegate.testing.multimodal import multimodal_batch, tiny_multimodal

IMAGE_ARCHS = ["qwen2_vl", "qwen2_5_vl", "llava", "omni_thinker", "omni"]
PROMPTS = ["Describe this picture.", "Hi there"]


@functools.cache
def case(arch):
    model, tok = tiny_multimodal(arch)
    return model, tok, multimodal_batch(arch, tok, PROMPTS, images=[True, False])


@functools.cache
def text_judge():
    model, tok = tiny_model_and_tokenizer("qwen2")
    return HFSafetyJudge(model, tok)


def judges(kind):
    if kind == "self":
        return None, None
    if kind == "callable-string":  # plain strings, any case, stripped
        return (lambda requests: [" UNSAFE\n" if "picture" in r.prompt else "Safe" for r in requests]), [
            "unsafe",
            "safe",
        ]
    if kind == "callable-verdict":
        return (lambda requests: [Verdict("unsafe", 0.9) for _ in requests]), ["unsafe", "unsafe"]
    return text_judge(), None  # an HF judge on another tiny model


@pytest.mark.parametrize("kind", ["self", "callable-string", "callable-verdict", "hf-tiny"])
@pytest.mark.parametrize("arch", IMAGE_ARCHS)
def test_safecode_runs_with_images_on_every_image_architecture_and_judge_kind(arch, kind):
    model, tok, batch = case(arch)
    judge, expected = judges(kind)
    assert "pixel_values" in batch
    if arch.startswith("omni"):
        assert "image_grid_thw" in batch
    defense = SafeCoDe(model, tok, judge=judge, steps=2)
    out = defense.generate(**batch, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    assert out.contrast_rows == [True, False]  # the image row was contrasted against its noised image
    assert out.neutral_forwards >= 1
    assert all(label in ("safe", "unsafe") for label in out.safety) and len(out.safety) == 2
    if expected is not None:
        assert out.safety == expected
        want = [0.9, 0.9] if kind == "callable-verdict" else [1.0, 0.0]
        assert out.safety_scores.tolist() == pytest.approx(want)


@pytest.mark.parametrize("arch", ["omni_thinker", "qwen2_vl", "llava"])
def test_self_judge_score_matches_an_uncached_forward(arch):
    """The cached continuation of the answer words must score what one full forward scores (the Omni thinker
    mis-shaped its attention without explicit positions)."""
    model, tok, _ = case(arch)
    judge = HFSafetyJudge(model, tok)
    text = judge._chat_text(verdict_prompt("Describe this picture.", ""))
    prefix = tok(text, add_special_tokens=False)["input_ids"]
    got = judge.answer_logprobs(prefix, ["unsafe", "safe"])
    root = judge.model
    for answer, value in zip(["unsafe", "safe"], got):
        tokens = tok(answer, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prefix + tokens])
        with torch.no_grad():
            logp = torch.log_softmax(root(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].float(), -1)
        want = sum(float(logp[len(prefix) - 1 + i, t]) for i, t in enumerate(tokens))
        assert abs(value - want) < 1e-3


def test_function_judge_accepts_any_case_and_bad_answers_fail_in_one_line():
    model, tok, batch = case("qwen2_vl")
    out = SafeCoDe(model, tok, judge=lambda requests: ["SAFE", " unsafe "], steps=1).generate(
        **batch, max_new_tokens=1, return_dict_in_generate=True
    )
    assert out.safety == ["safe", "unsafe"]
    for bad, needle in ((lambda r: ["maybe", "safe"], "'maybe'"), (lambda r: ["safe"] * 3, "3 answers"),
                        (lambda r: [object(), "safe"], "object"), (lambda r: None, "NoneType")):  # fmt: skip
        with pytest.raises(ValueError, match="a judge must return") as info:
            SafeCoDe(model, tok, judge=bad, steps=1).generate(**batch, max_new_tokens=1)
        assert needle in str(info.value) and "\n" not in str(info.value)
    one = SafeCoDe(model, tok, judge=lambda requests: "Unsafe", steps=1)  # one request: a bare answer is fine
    single = {k: v[:1] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v for k, v in batch.items()}
    assert one.generate(**single, max_new_tokens=1, return_dict_in_generate=True).safety == ["unsafe"]
    assert SafeCoDe(model, tok, judge=lambda r: ["safe", "safe"]).generate(
        **batch, max_new_tokens=1, verdicts=["UNSAFE", "safe"], return_dict_in_generate=True
    ).safety == ["unsafe", "safe"]


def test_safety_judge_subclass_label_case_is_normalised():
    from safegate.defenses.judges import FunctionSafetyJudge

    judge = FunctionSafetyJudge(lambda prompt, image: Verdict("Unsafe", 1.0))
    assert judge([JudgeRequest("x")])[0].label == "unsafe"
    with pytest.raises(ValueError, match="a judge must return"):
        FunctionSafetyJudge(lambda prompt, image: Verdict("harmful", 1.0))([JudgeRequest("y")])
