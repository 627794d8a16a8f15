"""Tiny random multimodal models and their input batches, built offline in milliseconds (tests, demos).

Architectures (`ARCHS`): `"qwen2_vl"`, `"qwen2_5_vl"`, `"llava"` (images), `"omni_thinker"` (the Qwen2.5-Omni
thinker: images and audio) and `"omni"` (the full Qwen2.5-Omni model without audio output; safegate gates its
thinker). All share `safegate.testing.tiny_tokenizer(multimodal=True)` and a 64-wide, 2-layer text decoder.

`multimodal_batch` builds what the real processor would return: chat template, placeholders expanded,
`pixel_values` / `image_grid_thw` (Qwen: 56×56 or 56×84 px images → 4 or 6 tokens; LLaVA: 28×28 px → 4
`<image>` tokens), `input_features` / `feature_attention_mask` (Omni: 0.5–1 s of audio → 13–25 tokens, features
padded to 200 frames as the Omni processor pads to max length) and `mm_token_type_ids` for Qwen-VL. Images and
audio are random but depend only on `seed` and the prompt text, so a row gives the same inputs alone or in any
batch. LLaVA goes through a real `LlavaProcessor` + `CLIPImageProcessorPil`; the Qwen-VL / Omni processors need
torchvision, so their inputs come from `Qwen2VLImageProcessorPil`, `WhisperFeatureExtractor` and
`safegate.data.multimodal.MultimodalInputBuilder`, which expands placeholders exactly as those processors do.

Example:
    >>> model, tok = tiny_multimodal("omni_thinker")
    >>> prompts = ["Describe it.", "Hi"]
    >>> batch = multimodal_batch("omni_thinker", tok, prompts, images=[True, False], audios=[True, False])
    >>> batch["pixel_values"].shape, batch["image_grid_thw"].tolist(), batch["input_features"].shape
    (torch.Size([24, 1176]), [[1, 4, 6]], torch.Size([1, 16, 200]))
    >>> model(**batch).logits.shape[:2] == batch["input_ids"].shape
    True
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np
import torch

from safegate.testing import text_config_kwargs, tiny_tokenizer

ARCHS = ("qwen2_vl", "qwen2_5_vl", "llava", "omni_thinker", "omni")
MODALITIES = {
    "qwen2_vl": ("image",),
    "qwen2_5_vl": ("image",),
    "llava": ("image",),
    "omni_thinker": ("image", "audio"),
    "omni": ("image", "audio"),
}
SAMPLING_RATE = 16000
AUDIO_CHUNK_SECONDS = 2  # feature extractor max length: 200 mel frames
LLAVA_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for p in m['content'] %}{% if p['type'] == 'image' %}<image>\n{% elif p['type'] == 'text' %}"
    "{{ p['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)  # ChatML with LLaVA's content parts (`{"type": "image"}` → `<image>\n`)
_MROPE = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}  # sums to head_dim/2 = 8
_QWEN25_VISION = dict(
    depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
    spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1],
)  # fmt: skip


def _check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise ValueError(f"`arch` must be one of {list(ARCHS)}, got {arch!r}.")


def _ids(tok: Any) -> dict[str, int]:
    names = {
        "vision_bos": "<|vision_bos|>", "vision_eos": "<|vision_eos|>", "image": "<|IMAGE|>", "video": "<|VIDEO|>",
        "audio_bos": "<|audio_bos|>", "audio_eos": "<|audio_eos|>", "audio": "<|AUDIO|>", "llava_image": "<image>",
    }  # fmt: skip
    ids = {key: tok.convert_tokens_to_ids(token) for key, token in names.items()}
    if any(i is None or i == tok.unk_token_id for i in ids.values()):
        raise ValueError(
            "the tokenizer lacks the multimodal tokens; use safegate.testing.tiny_tokenizer(multimodal=True)."
        )
    return ids


def tiny_config(arch: str, tok: Any) -> Any:
    """The transformers config of the tiny `arch` model, with placeholder ids taken from `tok`."""
    from transformers import LlavaConfig, Qwen2_5_VLConfig, Qwen2_5OmniConfig, Qwen2_5OmniThinkerConfig, Qwen2VLConfig

    _check_arch(arch)
    ids = _ids(tok)
    text = text_config_kwargs(tok, rope_parameters=dict(_MROPE))
    qwen_vision_ids = dict(
        image_token_id=ids["image"], video_token_id=ids["video"],
        vision_start_token_id=ids["vision_bos"], vision_end_token_id=ids["vision_eos"],
    )  # fmt: skip
    if arch == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=2)  # hidden_size = LLM width
        return Qwen2VLConfig(text_config=text, vision_config=vision, **qwen_vision_ids)
    if arch == "qwen2_5_vl":
        return Qwen2_5_VLConfig(text_config=text, vision_config=dict(_QWEN25_VISION), **qwen_vision_ids)
    if arch == "llava":
        vision = dict(
            model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, image_size=28, patch_size=14, projection_dim=32,
        )  # fmt: skip
        llama = text_config_kwargs(tok, model_type="llama")
        return LlavaConfig(
            text_config=llama, vision_config=vision, image_token_index=ids["llava_image"], image_seq_length=4
        )
    audio = dict(
        num_mel_bins=16, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64, d_model=32, output_dim=64,
        n_window=50, max_source_positions=1500,
    )  # fmt: skip
    thinker = Qwen2_5OmniThinkerConfig(
        text_config=text,
        vision_config=dict(_QWEN25_VISION),
        audio_config=audio,
        audio_token_index=ids["audio"],
        image_token_index=ids["image"],
        video_token_index=ids["video"],
        audio_start_token_id=ids["audio_bos"],
        audio_end_token_id=ids["audio_eos"],
        vision_start_token_id=ids["vision_bos"],  # not a declared field, but read on every forward
        vision_end_token_id=ids["vision_eos"],
        user_token_id=tok.convert_tokens_to_ids("<|im_start|>"),
    )
    if arch == "omni_thinker":
        return thinker
    talker_ids = dict(
        vocab_size=64, tts_text_start_token_id=1, tts_text_end_token_id=2, tts_text_pad_token_id=3,
        tts_codec_start_token_id=4, tts_codec_end_token_id=5, tts_codec_pad_token_id=6, tts_codec_mask_token_id=7,
        audio_token_index=10, image_token_index=11, video_token_index=12, vision_start_token_id=13,
        vision_end_token_id=14, audio_start_token_id=15, audio_end_token_id=16,
    )  # fmt: skip  # the talker is never built (enable_audio_output=False); valid ids keep the config quiet
    return Qwen2_5OmniConfig(thinker_config=thinker.to_dict(), talker_config=talker_ids, enable_audio_output=False)


def tiny_multimodal(arch: str, seed: int = 0) -> tuple[Any, Any]:
    """A tiny random multimodal model (eval mode) and its tokenizer; see `ARCHS`."""
    from transformers import (
        LlavaForConditionalGeneration,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5OmniForConditionalGeneration,
        Qwen2_5OmniThinkerForConditionalGeneration,
        Qwen2VLForConditionalGeneration,
    )

    _check_arch(arch)
    tok = tiny_tokenizer(multimodal=True)
    classes = {
        "qwen2_vl": Qwen2VLForConditionalGeneration,
        "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
        "llava": LlavaForConditionalGeneration,
        "omni_thinker": Qwen2_5OmniThinkerForConditionalGeneration,
        "omni": Qwen2_5OmniForConditionalGeneration,
    }
    torch.manual_seed(seed)
    model = classes[arch](tiny_config(arch, tok)).eval()
    text_module = model.thinker if arch == "omni" else model
    text_module.generation_config.pad_token_id = tok.pad_token_id
    text_module.generation_config.eos_token_id = tok.eos_token_id
    return model, tok


def random_image(seed: int, key: str, index: int, size: tuple[int, int]) -> Any:
    """A deterministic random RGB `PIL.Image` of `size` (width, height)."""
    from PIL import Image

    rng = np.random.default_rng([seed, zlib.crc32(key.encode()), index])
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def random_audio(seed: int, key: str, index: int, seconds: float) -> np.ndarray:
    """A deterministic random 16 kHz waveform of `seconds`."""
    rng = np.random.default_rng([seed, zlib.crc32(key.encode()), 1000 + index])
    return (0.1 * rng.standard_normal(int(seconds * SAMPLING_RATE))).astype(np.float32)


def tiny_llava_processor(tok: Any) -> Any:
    """A real `LlavaProcessor` (CLIP pillow image processor + `tok`) for the tiny LLaVA model, built offline."""
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=14,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,
        chat_template=LLAVA_TEMPLATE,
    )


def tiny_feature_extractor() -> Any:
    """`WhisperFeatureExtractor` for the tiny Omni audio tower: 16 mel bins, padded to 200 frames."""
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(feature_size=16, chunk_length=AUDIO_CHUNK_SECONDS)


def sample_inputs(
    arch: str, prompts: list[str], images: list[bool] | None = None, audios: list[bool] | None = None, seed: int = 0
) -> tuple[list[list[Any] | None], list[list[np.ndarray] | None]]:
    """The random images and audio clips `multimodal_batch` uses, per row (`None` where a row has none)."""
    _check_arch(arch)
    for name, flags, modality in (("images", images, "image"), ("audios", audios, "audio")):
        if flags is not None and len(flags) != len(prompts):
            raise ValueError(f"`{name}` must hold one bool per prompt: got {len(flags)} for {len(prompts)} prompts.")
        if flags is not None and any(flags) and modality not in MODALITIES[arch]:
            raise ValueError(f"{arch!r} takes {list(MODALITIES[arch])} besides text, not {modality}.")
    row_images: list[list[Any] | None] = []
    row_audios: list[list[np.ndarray] | None] = []
    for i, prompt in enumerate(prompts):
        variant = zlib.crc32(prompt.encode()) % 2
        if images is not None and images[i]:
            size = (28, 28) if arch == "llava" else ((56, 56), (84, 56))[variant]
            row_images.append([random_image(seed, prompt, 0, size)])
        else:
            row_images.append(None)
        if audios is not None and audios[i]:
            row_audios.append([random_audio(seed, prompt, 0, (1.0, 0.5)[variant])])
        else:
            row_audios.append(None)
    return row_images, row_audios


def multimodal_batch(
    arch: str,
    tok: Any,
    prompts: list[str],
    images: list[bool] | None = None,
    audios: list[bool] | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A left-padded chat batch with one random image / audio clip in the rows flagged by `images` / `audios`.

    Mixed rows are allowed (text-only, image, audio, image+audio for Omni). Keys are those the real processor
    returns for the architecture (see the module docstring); modality tensors appear only when some row has one.
    """
    from safegate.data.multimodal import MultimodalInputBuilder

    row_images, row_audios = sample_inputs(arch, prompts, images, audios, seed)
    config = tiny_config(arch, tok)
    processor = tiny_llava_processor(tok) if arch == "llava" else tok
    builder = MultimodalInputBuilder(config, processor, feature_extractor=tiny_feature_extractor())
    return builder.encode(prompts, row_images, row_audios)
