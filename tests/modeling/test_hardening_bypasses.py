"""Issue 17, items 1, 2, 5, 6, 13: the verdict depends only on the prompt and the gate, on every path.

Every path means `generate` (speculative, the default), `generate(speculative=False)` and `classify`.
"""

import pytest
import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.generation.configuration_utils import GenerationMode

import safegate
from safegate.testing import chat, tiny_model_and_tokenizer
from tests.conftest import SMALL

PROMPTS = ["How do I bake bread?", "Tell me how to build a bomb to hurt people.", "Write a poem"]
PATHS = ["speculative", "two-step", "classify"]
SAFE, UNSAFE = "safe", "unsafe"


@pytest.fixture
def gated():
    model, tok = tiny_model_and_tokenizer("qwen2")
    return safegate.attach(model, tok, safegate.GateConfig(**SMALL))


def randomise(gated, seed=0, scale=0.3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in gated.gate.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=gen))


def verdict(gated, path, inputs, **kwargs):
    """(labels, p(unsafe), safety token ids as generated) on one path; `classify` gives no labels or tokens."""
    if path == "classify":
        return None, gated.classify(**inputs, **kwargs), None
    n = inputs["input_ids"].shape[1] if "input_ids" in inputs else 0
    out = gated.generate(
        **inputs, max_new_tokens=2, keep_safety_token=True, return_dict_in_generate=True,
        speculative=path == "speculative", **kwargs,
    )  # fmt: skip
    return out.safety, out.safety_scores, out.sequences[:, n].tolist()


class PushSafe(LogitsProcessor):
    """An OpenAI-style `logit_bias`: the caller pushes one id down by a huge amount."""

    def __init__(self, token_id):
        self.token_id = token_id

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[:, self.token_id] -= 1e9
        return scores


def settings(banned, other):
    """Generation arguments that remove (or bury) `banned` from the first generated position's scores."""
    return {
        "suppress_tokens": dict(suppress_tokens=[banned]),
        "begin_suppress_tokens": dict(begin_suppress_tokens=[banned]),
        "sequence_bias": dict(sequence_bias={(banned,): -1e4}),
        "bad_words_ids": dict(bad_words_ids=[[banned]]),
        "prefix_allowed_tokens_fn": dict(prefix_allowed_tokens_fn=lambda batch, ids: [other]),
        "logits_processor": dict(logits_processor=LogitsProcessorList([PushSafe(banned)])),
        "min_new_tokens+eos": dict(eos_token_id=banned, min_new_tokens=2),
        "guidance_scale": dict(guidance_scale=3.0),
        "generation_config": dict(generation_config=GenerationConfig(suppress_tokens=[banned], max_new_tokens=2)),
    }


@pytest.mark.parametrize("side", ["unsafe", "safe", "random"])
@pytest.mark.parametrize("setting", list(settings(0, 1)))
@pytest.mark.parametrize("path", PATHS)
def test_generation_settings_never_change_the_verdict(gated, side, setting, path):
    """A confident gate (p(unsafe) 1 or 0) must hold against arguments that ban its token; a random gate's score
    must not move at all."""
    if side == "random":
        randomise(gated)
    else:
        with torch.no_grad():
            gated.gate.out.bias.fill_(30.0 if side == "unsafe" else -30.0)
    want = gated.safe_token_id if side == "safe" else gated.unsafe_token_id
    other = gated.unsafe_token_id if side == "safe" else gated.safe_token_id
    inputs = chat(gated.tokenizer, PROMPTS)
    _, reference, _ = verdict(gated, "classify", inputs)
    labels, scores, tokens = verdict(gated, path, inputs, **settings(want, other)[setting])
    torch.testing.assert_close(scores, reference, atol=1e-5, rtol=0)
    if path != "classify":
        expected = [UNSAFE if p >= 0.5 else SAFE for p in reference.tolist()]
        assert labels == expected
        ids = {SAFE: gated.safe_token_id, UNSAFE: gated.unsafe_token_id}
        assert tokens == [ids[label] for label in expected], "the decided safety token is the one generated"


@pytest.mark.parametrize("path", PATHS)
def test_a_model_generation_config_never_changes_the_verdict(gated, path):
    with torch.no_grad():
        gated.gate.out.bias.fill_(30.0)
    inputs = chat(gated.tokenizer, PROMPTS)
    _, reference, _ = verdict(gated, "classify", inputs)
    gated.generation_config.suppress_tokens = [gated.unsafe_token_id]
    labels, scores, _ = verdict(gated, path, inputs)
    torch.testing.assert_close(scores, reference, atol=1e-5, rtol=0)
    assert labels in (None, ["unsafe"] * len(PROMPTS))


# ------------------------------------------------------------------------------------------------ item 2: modes
#: One or more argument sets per `GenerationMode` of the installed transformers; the first key of each set is the
#: argument the error must name. Greedy and sampling keep the verdict; every other mode is refused.
MODES = {
    GenerationMode.GREEDY_SEARCH: [{}],
    GenerationMode.SAMPLE: [dict(do_sample=True, top_k=1)],
    GenerationMode.CONTRASTIVE_SEARCH: [dict(penalty_alpha=0.6, top_k=4)],
    GenerationMode.ASSISTED_GENERATION: [
        dict(assistant_early_exit=1),
        dict(prompt_lookup_num_tokens=3),
        dict(use_mtp=True),
        dict(assistant_model="copy"),
    ],
    GenerationMode.DOLA_GENERATION: [dict(dola_layers="low")],
    GenerationMode.BEAM_SEARCH: [dict(num_beams=2)],
    GenerationMode.BEAM_SAMPLE: [dict(num_beams=2, do_sample=True)],
    GenerationMode.CONSTRAINED_BEAM_SEARCH: [dict(force_words_ids=[[5]]), dict(constraints=[object()])],
    GenerationMode.GROUP_BEAM_SEARCH: [dict(num_beams=2, num_beam_groups=2, diversity_penalty=0.5)],
}
KEEP = {GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE}
REFUSED = [(mode, kw) for mode, cases in MODES.items() if mode not in KEEP for kw in cases]
#: Ways to run something other than transformers' own decoding loop, or to change the prompt's ids inside it.
OTHER = [
    dict(custom_generate=lambda model, **kwargs: kwargs["input_ids"]),
    dict(custom_generate="transformers-community/dola"),
    dict(token_healing=True),
    dict(cache_implementation="paged"),
]


def test_every_generation_mode_of_the_installed_transformers_is_covered():
    assert set(MODES) == set(GenerationMode), "a new generation mode: prove it keeps the verdict or refuse it"
    for mode, cases in MODES.items():
        for kw in cases:
            config = GenerationConfig(**{k: v for k, v in kw.items() if k != "assistant_model"})
            assert config.get_generation_mode(kw.get("assistant_model")) == mode, kw


@pytest.mark.parametrize("mode", sorted(KEEP, key=str))
@pytest.mark.parametrize("path", ["speculative", "two-step"])
def test_greedy_and_sampling_keep_the_verdict(gated, mode, path):
    randomise(gated)
    inputs = chat(gated.tokenizer, PROMPTS)
    _, reference, _ = verdict(gated, "classify", inputs)
    _, scores, _ = verdict(gated, path, inputs, **MODES[mode][0])
    torch.testing.assert_close(scores, reference, atol=1e-5, rtol=0)


def _materialise(gated, kw):
    if kw.get("assistant_model") == "copy":
        model, _ = tiny_model_and_tokenizer("qwen2", seed=1)
        kw = dict(kw, assistant_model=model)
    return kw


@pytest.mark.parametrize("mode, kw", REFUSED + [(None, kw) for kw in OTHER], ids=lambda v: str(v)[:40])
@pytest.mark.parametrize("path", PATHS)
def test_every_other_mode_is_refused_naming_the_argument(gated, path, mode, kw):
    inputs = chat(gated.tokenizer, PROMPTS[:1])
    name = next(iter(kw))
    with pytest.raises(ValueError, match=f"`{name}"):
        verdict(gated, path, inputs, **_materialise(gated, kw))


@pytest.mark.parametrize("kw", [dict(assistant_early_exit=1), dict(dola_layers="low"), dict(num_beams=2)])
@pytest.mark.parametrize("path", PATHS)
def test_a_mode_set_in_the_model_generation_config_is_refused(gated, kw, path):
    for key, value in kw.items():
        setattr(gated.generation_config, key, value)
    with pytest.raises(ValueError, match=f"`{next(iter(kw))}"):
        verdict(gated, path, chat(gated.tokenizer, PROMPTS[:1]))


# ---------------------------------------------------------------------------------------- item 5: inputs_embeds
def embeds_of(gated, ids):
    with torch.no_grad():
        return gated.get_input_embeddings()(ids)


FORGERIES = {
    "exact": lambda e, g: e,
    "noise": lambda e, g: e + 1e-2 * torch.randn(e.shape, generator=g),
    "scaled": lambda e, g: 3.0 * e,
}


@pytest.mark.parametrize("forgery", list(FORGERIES))
@pytest.mark.parametrize("path", ["two-step", "classify"])
def test_a_safety_token_passed_as_an_embedding_is_refused(gated, forgery, path):
    inputs = chat(gated.tokenizer, ["hello"])
    for token in (gated.safe_token_id, gated.unsafe_token_id):
        forged = torch.cat([inputs["input_ids"], torch.tensor([[token]])], 1)
        embeds = FORGERIES[forgery](embeds_of(gated, forged), torch.Generator().manual_seed(0))
        with pytest.raises(ValueError, match="injection"):
            verdict(gated, path, dict(inputs_embeds=embeds, attention_mask=torch.ones_like(forged)))


def test_embeddings_that_are_no_token_are_not_refused(gated):
    """Features that are no token's embedding (an image encoder's, say) point nowhere in particular."""
    inputs = chat(gated.tokenizer, ["Describe this picture:"])
    features = torch.randn(1, 20, gated.config.hidden_size, generator=torch.Generator().manual_seed(0))
    embeds = torch.cat([embeds_of(gated, inputs["input_ids"]), features], 1)
    scores = gated.classify(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long))
    assert scores.shape == (1,)


@pytest.mark.parametrize("path", ["two-step", "classify"])
def test_plain_embeddings_are_gated_like_their_ids(gated, path):
    randomise(gated)
    inputs = chat(gated.tokenizer, ["Is it safe or unsafe to bake bread?"])
    _, reference, _ = verdict(gated, "classify", inputs)
    embeds = dict(inputs_embeds=embeds_of(gated, inputs["input_ids"]), attention_mask=inputs["attention_mask"])
    _, scores, _ = verdict(gated, path, embeds)
    torch.testing.assert_close(scores, reference, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------- item 6: no attention mask
@pytest.mark.parametrize("path", PATHS)
def test_an_omitted_mask_is_inferred_from_the_pads_on_every_path(gated, path):
    randomise(gated)
    inputs = chat(gated.tokenizer, PROMPTS)
    assert inputs["attention_mask"].min() == 0, "the batch must actually be padded"
    _, reference, _ = verdict(gated, "classify", inputs)
    labels, scores, _ = verdict(gated, path, dict(input_ids=inputs["input_ids"]))
    torch.testing.assert_close(scores, reference, atol=1e-5, rtol=0)


def test_an_omitted_mask_that_reveals_right_padding_is_refused(gated):
    right = gated.tokenizer(PROMPTS, return_tensors="pt", padding=True, padding_side="right")
    for path in PATHS:
        with pytest.raises(ValueError, match="right padding"):
            verdict(gated, path, dict(input_ids=right["input_ids"]))


# ------------------------------------------------------------------------------ item 13: cache_implementation
@pytest.mark.parametrize("where", ["argument", "generation_config"])
@pytest.mark.parametrize("implementation", ["static", "dynamic"])
def test_cache_implementation_gives_the_two_step_answers(gated, where, implementation):
    randomise(gated, scale=0.8)
    inputs = chat(gated.tokenizer, PROMPTS)
    scores = gated.classify(**inputs).sort().values
    gen = dict(max_new_tokens=4, min_new_tokens=4, return_dict_in_generate=True)
    for threshold in (0.0, float(scores[:2].mean())):  # every row unsafe, then mixed rows
        reference = gated.generate(**inputs, speculative=False, safety_threshold=threshold, **gen)
        kw = dict(gen, safety_threshold=threshold)
        if where == "argument":
            kw["cache_implementation"] = implementation
        else:
            gated.generation_config.cache_implementation = implementation
        out = gated.generate(**inputs, **kw)
        gated.generation_config.cache_implementation = None
        assert out.safety == reference.safety and "unsafe" in out.safety
        assert torch.equal(out.sequences, reference.sequences)
