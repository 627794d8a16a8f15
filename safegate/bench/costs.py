"""Computed, not timed: the gate's FLOPs against the prefill's, and a bundle's bytes for Qwen2.5-Omni shapes.

Bundle sizes are counted on the `meta` device (no weights are allocated).

Example:
    >>> omni_bundle_bytes("7b")["total_bytes"] < 30e6
    True
    >>> gate_flops(hidden=896, attention_dim=256, prompt_tokens=256, params=494_000_000)["ratio"] < 1e-3
    True
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["OMNI_TEXT", "gate_flops", "omni_bundle_bytes"]

OMNI_TEXT = {
    "3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
               num_key_value_heads=2, vocab_size=151936),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064),
}  # fmt: skip


def gate_flops(hidden: int, attention_dim: int, prompt_tokens: int, params: int, members: int = 1) -> dict[str, float]:
    """Multiply-adds x2 of the gate (O(T d) form; `members` gates of an ensemble) vs the prefill of the backbone
    (2 * params * T)."""
    one = hidden * attention_dim + 2 * prompt_tokens * hidden + hidden * attention_dim + 3 * attention_dim
    gate = 2 * members * one
    prefill = 2 * params * prompt_tokens
    return {"gate": float(gate), "prefill": float(prefill), "ratio": gate / prefill}


def omni_bundle_bytes(size: str, lora_r: int = 8, attention_dim: int = 256) -> dict[str, Any]:
    """Bytes of a default bundle for the Qwen2.5-Omni thinker of `size` ("3b"/"7b"), counted on the meta device."""
    from transformers import Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration

    from safegate.modeling.arch import resolve
    from safegate.modeling.config import GateConfig

    rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}
    text = dict(OMNI_TEXT[size], rope_parameters=rope)
    config = Qwen2_5OmniThinkerConfig(text_config=text, vision_start_token_id=151652)
    config.vision_config.out_hidden_size = config.audio_config.output_dim = text["hidden_size"]
    with torch.device("meta"):
        thinker = Qwen2_5OmniThinkerForConditionalGeneration(config)
    defaults = GateConfig(lora_r=lora_r, attention_dim=attention_dim)
    arch = resolve(thinker, defaults.lora_target, defaults.lora_modules)
    import re

    pattern = re.compile(arch.lora_target)
    lora = sum(lora_r * (m.in_features + m.out_features) for n, m in thinker.named_modules()
               if isinstance(m, torch.nn.Linear) and pattern.fullmatch(n))  # fmt: skip
    d = text["hidden_size"]
    gate = 3 * d * attention_dim + 2 * attention_dim + attention_dim + 1 + d
    rows = 2 * d * (1 if arch.tied else 2)
    total = 4 * lora + 4 * gate + 4 * rows
    return {"lora_params": lora, "gate_params": gate, "token_row_params": rows, "total_bytes": total,
            "note": "float32 tensors; json/README add a few KB"}  # fmt: skip
