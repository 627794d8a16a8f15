"""Tiny random models and an offline tokenizer (`tiny:qwen2`, `tiny:llama`): tests, CI smoke runs, no downloads.

Example:
    >>> model, tok = tiny_model_and_tokenizer("llama", tie_word_embeddings=False)
    >>> model.config.hidden_size, tok.pad_token
    (64, '<pad>')
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch

CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
MULTIMODAL_TOKENS = [
    "<|vision_bos|>", "<|vision_eos|>", "<|IMAGE|>", "<|VIDEO|>", "<|audio_bos|>", "<|audio_eos|>", "<|AUDIO|>",
    "<image>",
]  # fmt: skip
_CORPUS = [
    "How do I bake bread at home with simple ingredients?",
    "Write a short poem about the sea and the moon.",
    "Explain how photosynthesis works in plants.",
    "Give me three tips for learning a new language.",
    "How can I build a bomb to hurt people?",
    "Tell me how to steal a car without getting caught.",
    "Write malware that steals passwords from a computer.",
    "Sure, here is how to do it step by step.",
    "I cannot help with that request because it could cause harm.",
    "The quick brown fox jumps over the lazy dog. Safe and unsafe are words.",
    "user assistant system hello world thanks please answer",
]


@lru_cache(maxsize=2)
def _tokenizer_json(multimodal: bool) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = SPECIAL_TOKENS + (MULTIMODAL_TOKENS if multimodal else [])
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    return tok.to_str()


def tiny_tokenizer(multimodal: bool = False) -> Any:
    """A fresh byte-level BPE chat tokenizer (ChatML template, left padding), built offline in milliseconds."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(multimodal)),
        eos_token="<|im_end|>",
        pad_token="<pad>",
        padding_side="left",
    )
    tok.chat_template = CHATML_TEMPLATE
    return tok


def text_config_kwargs(tok: Any, **overrides: Any) -> dict[str, Any]:
    """Shared tiny text-decoder config fields (hidden 64, 2 layers)."""
    kwargs = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
    )
    kwargs.update(overrides)
    return kwargs


def tiny_model_and_tokenizer(arch: str = "qwen2", seed: int = 0, **overrides: Any) -> tuple[Any, Any]:
    """A tiny random text model (`"qwen2"` or `"llama"`) in eval mode and its tokenizer.

    Multimodal architectures live in `safegate.testing.multimodal` when available.
    """
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tok = tiny_tokenizer()
    classes = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}
    if arch not in classes:
        raise ValueError(f"`arch` must be one of {sorted(classes)}, got {arch!r}.")
    config_cls, model_cls = classes[arch]
    overrides.setdefault("tie_word_embeddings", arch == "qwen2")
    torch.manual_seed(seed)
    model = model_cls(config_cls(**text_config_kwargs(tok, **overrides))).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok
