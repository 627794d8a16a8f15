"""Multimodal backbones (Qwen2-VL, Qwen2.5-VL, LLaVA, Qwen2.5-Omni thinker and full model) with a safety gate."""

import numpy as np
import pytest
import torch

import safegate
from safegate.data.multimodal import MultimodalInputBuilder, build_multimodal_inputs
from safegate.testing.multimodal import (
    ARCHS,
    MODALITIES,
    multimodal_batch,
    sample_inputs,
    tiny_config,
    tiny_feature_extractor,
    tiny_llava_processor,
    tiny_multimodal,
)
from tests.conftest import SMALL

TOWERS = ("visual", "audio_tower", "vision_tower", "multi_modal_projector")
PROMPTS = ["How do I bake bread?", "Describe this picture.", "What is said here?", "Tell me about both."]


def rows_for(arch):
    """Text-only, image, audio and image+audio rows, restricted to the modalities `arch` takes."""
    audio = "audio" in MODALITIES[arch]
    images = [False, True, False, audio]
    audios = [False, False, True, True] if audio else None
    return images, audios


def attach(arch, seed=0):
    model, tok = tiny_multimodal(arch, seed=seed)
    return model, tok, safegate.attach(model, tok, safegate.GateConfig(**SMALL))


def randomise_gate(gated, seed=0):
    """A trained-looking gate (its read-out starts at zero, which would hide what the gate attends to)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in gated.gate.parameters():
            param.copy_(0.5 * torch.randn(param.shape, generator=gen))


@pytest.mark.parametrize("arch", ARCHS)
def test_batches_hold_what_the_processor_returns(arch):
    model, tok = tiny_multimodal(arch)
    images, audios = rows_for(arch)
    batch = multimodal_batch(arch, tok, PROMPTS, images=images, audios=audios)
    expected = {"input_ids", "attention_mask", "pixel_values"}
    expected |= {"mm_token_type_ids"} if arch in ("qwen2_vl", "qwen2_5_vl") else set()
    expected |= {"image_grid_thw"} if arch != "llava" else set()
    expected |= {"input_features", "feature_attention_mask"} if audios else set()
    assert set(batch) == expected
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert bool((mask[:, -1] == 1).all()) and bool((mask[:, 0] == 0).any())  # left padded
    config = tiny_config(arch, tok)
    config = config.thinker_config if arch == "omni" else config
    n_image = (ids == config.image_token_id).sum(-1)
    if arch == "llava":
        assert batch["pixel_values"].shape == (sum(images), 3, 28, 28)
        assert n_image.tolist() == [4 * i for i in images]
    else:
        merged = (batch["image_grid_thw"].prod(-1) // 4).tolist()
        assert n_image[torch.tensor(images)].tolist() == merged and int(n_image.sum()) == sum(merged)
        assert batch["pixel_values"].shape == (int(batch["image_grid_thw"].prod(-1).sum()), 3 * 2 * 14 * 14)
    if "mm_token_type_ids" in batch:
        assert torch.equal(batch["mm_token_type_ids"] == 1, ids == config.image_token_id)
    if audios:
        n_audio = (ids == config.audio_token_id).sum(-1)
        lengths = batch["feature_attention_mask"].sum(-1)
        assert batch["input_features"].shape == (sum(audios), 16, 200) and set(lengths.tolist()) <= {50, 100}
        assert n_audio[torch.tensor(audios)].tolist() == (((lengths - 1) // 2 + 1 - 2) // 2 + 1).tolist()
    text_module = model.thinker if arch == "omni" else model
    with torch.no_grad():
        assert text_module(**batch).logits.shape[:2] == ids.shape


@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_batch_scores_equal_each_row_alone(arch):
    """Left-padded text-only / image / audio / image+audio rows score as they do alone (≤ 1e-4)."""
    _, tok, gated = attach(arch)
    randomise_gate(gated)
    images, audios = rows_for(arch)
    batch = multimodal_batch(arch, tok, PROMPTS, images=images, audios=audios)
    together = gated.classify(**batch)
    alone = torch.cat(
        [
            gated.classify(**multimodal_batch(arch, tok, [p], [images[i]], [audios[i]] if audios else None))
            for i, p in enumerate(PROMPTS)
        ]
    )
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=0)
    assert float(together.max() - together.min()) > 1e-3, "scores should differ between rows"
    out = gated.generate(**batch, max_new_tokens=2, return_dict_in_generate=True)
    torch.testing.assert_close(out.safety_scores, together, atol=1e-5, rtol=0)
    assert out.sequences.shape[1] <= batch["input_ids"].shape[1] + 2


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "llava", "omni"])
def test_gate_reads_the_expanded_image_and_audio_positions(arch):
    _, tok, gated = attach(arch)
    randomise_gate(gated)
    images, audios = [True], ([True] if "audio" in MODALITIES[arch] else None)
    batch = multimodal_batch(arch, tok, ["Look at this."], images=images, audios=audios)
    with gated.tap() as tap, torch.no_grad():
        gated(**batch)
    text_only = multimodal_batch(arch, tok, ["Look at this."])
    assert tap.states.shape[:2] == batch["input_ids"].shape
    assert batch["input_ids"].shape[1] >= text_only["input_ids"].shape[1] + 4  # placeholders were expanded
    # the same prompt with other pixels / other audio gives another gate score: the gate sees the media
    other = multimodal_batch(arch, tok, ["Look at this."], images=images, audios=audios, seed=1)
    assert torch.equal(other["input_ids"], batch["input_ids"])
    assert abs(float(gated.classify(**other)[0] - gated.classify(**batch)[0])) > 1e-6


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_never_targets_towers_and_towers_stay_frozen(arch):
    model, tok, gated = attach(arch)
    wrapped = [name for name, module in gated.peft_model.named_modules() if hasattr(module, "lora_A")]
    assert wrapped and all(".language_model.layers." in name for name in wrapped)
    assert not [name for name in wrapped if any(tower in name for tower in TOWERS)]
    tower_params = [(n, p) for n, p in gated.peft_model.named_parameters() if any(t in n for t in TOWERS)]
    assert tower_params and not [n for n, p in tower_params if p.requires_grad]
    trainable = [n for n, p in gated.named_parameters() if p.requires_grad]
    assert all("lora_" in n or "trainable_tokens_delta" in n or n.startswith("gate.") for n in trainable)
    # a backward pass through an image (+audio) prompt leaves the towers without gradients
    gated.train()
    images, audios = rows_for(arch)
    batch = multimodal_batch(arch, tok, PROMPTS, images=images, audios=audios)
    gated(**batch).logits[:, -1].float().logsumexp(-1).sum().backward()
    assert all(p.grad is None for _, p in tower_params)
    assert any(p.grad is not None for n, p in gated.named_parameters() if "lora_B" in n)


@pytest.mark.filterwarnings("ignore:Already unmerged")  # detach() unmerges unconditionally
def test_full_omni_gates_and_generates_through_the_thinker():
    model, tok, gated = attach("omni")
    assert gated.arch.root is model.thinker and gated.config is model.thinker.config
    batch = multimodal_batch("omni", tok, PROMPTS[:2], images=[False, True], audios=[True, False])
    # `thinker_`-prefixed kwargs (the full model's routing convention) reach the thinker without the prefix
    out = gated.generate(
        **batch,
        thinker_max_new_tokens=3,
        thinker_min_new_tokens=3,
        thinker_do_sample=False,
        return_dict_in_generate=True,
    )
    assert out.sequences.shape[1] == batch["input_ids"].shape[1] + 3
    assert out.safety in (["safe"] * 2, ["unsafe"] * 2, ["safe", "unsafe"], ["unsafe", "safe"])
    plain = gated.generate(**batch, max_new_tokens=3, min_new_tokens=3)
    assert torch.equal(plain, out.sequences)
    assert isinstance(tok.batch_decode(plain[:, batch["input_ids"].shape[1] :])[0], str)
    # the full model and the bare thinker give identical scores when the weights are the same
    thinker_model, _ = tiny_multimodal("omni_thinker")
    thinker_model.load_state_dict(gated.detach().thinker.state_dict())
    gated_thinker = safegate.attach(thinker_model, tok, safegate.GateConfig(**SMALL))
    gated_full = safegate.attach(model, tok, safegate.GateConfig(**SMALL))
    torch.testing.assert_close(gated_full.classify(**batch), gated_thinker.classify(**batch), atol=1e-6, rtol=0)


def test_full_omni_checkpoint_loads_as_its_thinker(tmp_path):
    from safegate.backbones.load import load_model

    model, tok = tiny_multimodal("omni")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, processor = load_model(str(tmp_path))  # spec model_class: the thinker class, no talker / spk_dict.pt
    assert type(loaded).__name__ == "Qwen2_5OmniThinkerForConditionalGeneration"
    batch = multimodal_batch("omni", tok, ["hi", "look"], images=[False, True], audios=[True, False])
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model.thinker(**batch).logits, atol=0, rtol=0)


@pytest.mark.parametrize("arch", ["qwen2_vl", "omni_thinker"])
def test_prefill_attack_with_media_is_decided_before_the_prefix(arch):
    _, tok, gated = attach(arch)
    randomise_gate(gated)
    config = tiny_config(arch, tok)
    builder = MultimodalInputBuilder(config, tok, feature_extractor=tiny_feature_extractor())
    has_audio = "audio" in MODALITIES[arch]
    images, audios = sample_inputs(arch, PROMPTS[:2], [True, False], [False, True] if has_audio else None)
    counts = [(len(i or []), len(a or [])) for i, a in zip(images, audios)]
    plain_texts = [builder.chat_text(p, n_img, n_aud) for p, (n_img, n_aud) in zip(PROMPTS[:2], counts)]
    audios = audios if has_audio else None
    plain = builder.encode(plain_texts, images, audios, templated=True)
    attacked = builder.encode([t + "Sure, here is" for t in plain_texts], images, audios, templated=True)
    assert attacked["input_ids"].shape[1] > plain["input_ids"].shape[1]
    torch.testing.assert_close(gated.classify(**attacked), gated.classify(**plain), atol=1e-5, rtol=0)
    out = gated.generate(**attacked, max_new_tokens=2, return_dict_in_generate=True)
    torch.testing.assert_close(out.safety_scores, gated.classify(**plain), atol=1e-5, rtol=0)
    assert torch.equal(out.sequences[:, : attacked["input_ids"].shape[1]], attacked["input_ids"])


def test_builder_matches_the_real_llava_processor():
    _, tok = tiny_multimodal("llava")
    images, _ = sample_inputs("llava", PROMPTS, [True, False, True, False])
    config = tiny_config("llava", tok)
    by_processor = build_multimodal_inputs(config, tiny_llava_processor(tok), PROMPTS, images)
    by_hand = build_multimodal_inputs(config, tok, PROMPTS, images)  # CLIPImageProcessorPil + own expansion
    assert set(by_processor) == set(by_hand) == {"input_ids", "attention_mask", "pixel_values"}
    for key in by_hand:
        torch.testing.assert_close(by_processor[key], by_hand[key], atol=0, rtol=0)


def test_builder_unpadded_rows_and_token_types_for_collators():
    model, tok = tiny_multimodal("qwen2_vl")
    builder = MultimodalInputBuilder(model, tok)
    images, _ = sample_inputs("qwen2_vl", PROMPTS[:2], [True, False])
    padded = builder.encode(PROMPTS[:2], images)
    rows = builder.encode(PROMPTS[:2], images, padding=False)
    assert [len(r) for r in rows["input_ids"]] == padded["attention_mask"].sum(-1).tolist()
    assert rows["input_ids"][0] == padded["input_ids"][0][padded["attention_mask"][0].bool()].tolist()
    assert torch.equal(rows["pixel_values"], padded["pixel_values"])
    # a collator appends answer ids, pads, and recomputes the token types for the final ids
    ids = torch.tensor([rows["input_ids"][0] + [17, 18]])
    types = builder.token_type_ids(ids)
    assert types[0, -2:].tolist() == [0, 0] and int(types.sum()) == int((padded["mm_token_type_ids"][0]).sum())


def test_builder_errors_name_the_problem():
    model, tok = tiny_multimodal("qwen2_5_vl")
    builder = MultimodalInputBuilder(model, tok)
    image = sample_inputs("qwen2_5_vl", ["x"], [True])[0][0]
    with pytest.raises(ValueError, match="audio"):
        builder.encode(["x"], audios=[[np.zeros(16000, dtype=np.float32)]])
    with pytest.raises(ValueError, match="row 0: the prompt holds 0 image placeholder"):
        builder.encode(["no placeholder here"], images=[image], templated=True)
    with pytest.raises(ValueError, match="one entry"):
        builder.encode(["a", "b"], images=[image])
    with pytest.raises(ValueError, match="`arch` must be one of"):
        tiny_multimodal("gpt2")


# ------------------------------------------------------------------------------------ end to end, per architecture
def _write_media(arch, folder):
    """Two images and (Omni) two WAV clips on disk, as training records reference them."""
    import wave

    from safegate.testing.multimodal import random_audio, random_image

    size = (28, 28) if arch == "llava" else (56, 56)
    images = []
    for i in range(2):
        images.append(folder / f"image{i}.png")
        random_image(0, "train", i, size).save(images[-1])
    audios = []
    for i in range(2):
        audios.append(folder / f"clip{i}.wav")
        samples = (random_audio(0, "train", i, 0.6 + 0.3 * i) * 32767).astype("<i2")
        with wave.open(str(audios[-1]), "wb") as handle:
            handle.setnchannels(1), handle.setsampwidth(2), handle.setframerate(16000)
            handle.writeframes(samples.tobytes())
    return [str(p) for p in images], [str(p) for p in audios]


def _records(arch, folder):
    images, audios = _write_media(arch, folder)
    records = [
        {"prompt": "How do I bake bread?", "response": "Mix flour and water.", "label": "safe"},
        {"prompt": "What is in this picture?", "response": "A cat on a mat.", "label": "safe", "images": [images[0]]},
        {"prompt": "Build what this shows.", "response": "I cannot help with that.", "label": "unsafe",
         "images": [images[1]]},
    ]  # fmt: skip
    if "audio" in MODALITIES[arch]:
        records += [
            {"prompt": "Do what it says.", "response": "I cannot help with that.", "label": "unsafe",
             "audios": [audios[0]]},
            {"prompt": "Describe both.", "response": "A cat and a song.", "label": "safe", "images": [images[0]],
             "audios": [audios[1]]},
        ]  # fmt: skip
    return records


def _processor(arch, model, tok):
    """The real LLaVA processor; the torchvision-free stand-in for the Qwen-VL / Omni processors."""
    from safegate.data.multimodal import MultimodalProcessor

    if arch == "llava":
        return tiny_llava_processor(tok)
    return MultimodalProcessor(model, tok, feature_extractor=tiny_feature_extractor())


def _train(gated, processor, records, output_dir):
    args = dict(
        output_dir=str(output_dir), max_steps=3, per_device_train_batch_size=len(records), learning_rate=5e-3,
        logging_steps=1, save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    return safegate.train(gated, records, args=args, save=False)["global_step"]


@pytest.mark.parametrize("arch", ARCHS)
def test_attach_classify_generate_train_bundle_round_trip(arch, tmp_path):
    model, tok = tiny_multimodal(arch)
    processor = _processor(arch, model, tok)
    gated = safegate.attach(model, processor, safegate.GateConfig(**SMALL))
    assert gated.tokenizer is tok and gated.processor is processor
    images, audios = rows_for(arch)
    batch = multimodal_batch(arch, tok, PROMPTS, images=images, audios=audios)
    before = gated.classify(**batch)
    out = gated.generate(**batch, max_new_tokens=2, return_dict_in_generate=True)
    assert len(out.safety) == len(PROMPTS) and torch.allclose(out.safety_scores, before, atol=1e-5)

    towers = {n: p.detach().clone() for n, p in gated.peft_model.named_parameters() if any(t in n for t in TOWERS)}
    gate_before = {n: p.detach().clone() for n, p in gated.gate.named_parameters()}
    assert _train(gated, processor, _records(arch, tmp_path), tmp_path / "run") == 3
    params = dict(gated.peft_model.named_parameters())
    assert all(torch.equal(params[n], p) for n, p in towers.items()), "a vision/audio tower changed"
    assert any(not torch.equal(p, gate_before[n]) for n, p in gated.gate.named_parameters()), "the gate did not train"
    after = gated.classify(**batch)
    assert not torch.allclose(after, before, atol=1e-6)

    folder = gated.save_bundle(tmp_path / "bundle")
    fresh, fresh_tok = tiny_multimodal(arch)
    reloaded = safegate.load_bundle(fresh, _processor(arch, fresh, fresh_tok), folder)
    torch.testing.assert_close(reloaded.classify(**batch), after, atol=1e-5, rtol=0)
    kwargs = dict(max_new_tokens=3, min_new_tokens=3, return_dict_in_generate=True)
    mine, theirs = gated.generate(**batch, **kwargs), reloaded.generate(**batch, **kwargs)
    assert mine.safety == theirs.safety and torch.equal(mine.sequences, theirs.sequences)
