"""Test helpers: tiny random models (from `safegate.backbones.tiny`) and chat inputs, for safegate's tests and users'.

Example:
    >>> model, tok = tiny_model_and_tokenizer("llama", tie_word_embeddings=False)
    >>> chat(tok, ["Hi!"])["input_ids"].shape[0]
    1
"""

from __future__ import annotations

from typing import Any

import torch

from safegate.backbones.tiny import (
    CHATML_TEMPLATE,
    MULTIMODAL_TOKENS,
    SPECIAL_TOKENS,
    text_config_kwargs,
    tiny_model_and_tokenizer,
    tiny_tokenizer,
)

__all__ = [
    "CHATML_TEMPLATE",
    "MULTIMODAL_TOKENS",
    "SPECIAL_TOKENS",
    "chat",
    "text_config_kwargs",
    "tiny_model_and_tokenizer",
    "tiny_tokenizer",
]


def chat(tok: Any, prompts: list[str], prefix: str = "", system: str | None = None) -> dict[str, torch.Tensor]:
    """Left-padded chat-template batch for `prompts`, optionally with an assistant `prefix` (prefill attack)."""
    texts = []
    for prompt in prompts:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        texts.append(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + prefix)
    return dict(tok(texts, return_tensors="pt", padding=True, add_special_tokens=False))
