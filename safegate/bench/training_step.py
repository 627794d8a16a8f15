"""The CASA training step against a plain PEFT LoRA step: same LoRA config, same batch and targets, paired timing.

Example:
    >>> import copy, safegate
    >>> from safegate.backbones.tiny import tiny_model_and_tokenizer
    >>> model, tok = tiny_model_and_tokenizer("qwen2", vocab_size=1024)  # room for the safety tokens in `plain`
    >>> plain = copy.deepcopy(model)
    >>> gated = safegate.attach(model, tok)
    >>> gated.merge_adapter()
    >>> result = training_step_ratio(gated, plain, vocab=500, device="cpu", pairs=1, prompt=16, length=32, batch=2)
    >>> result["logit_rows"], result["ratio"] > 0
    ({'plain': 64, 'gated': 32}, True)
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from safegate.bench.timing import paired_timing

__all__ = ["training_step_ratio"]


def training_step_ratio(
    gated: Any, plain: Any, vocab: int, device: str, pairs: int, prompt: int, length: int = 128, batch: int = 8
) -> dict[str, Any]:
    """CASA step (`training.objective.casa_loss`) vs a plain PEFT LoRA step: same LoRA config, batch and targets.

    Each row holds `prompt` prompt tokens, the safety token and `length - prompt - 1` response tokens; half the rows
    are harmful. The plain step is supervised fine-tuning as PEFT users run it: `labels` with the prompt masked
    (-100), transformers' own loss.
    """
    from peft import LoraConfig

    from safegate.modeling.model import quiet_get_peft_model
    from safegate.training.objective import casa_loss

    config = gated.gate_config
    gated.unmerge_adapter()
    gated.train()
    lora = quiet_get_peft_model(copy.deepcopy(plain), LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha,
                                lora_dropout=config.lora_dropout, target_modules=gated.arch.lora_target))  # fmt: skip
    lora.train()
    torch.manual_seed(0)
    ids = torch.randint(4, vocab, (batch, length), device=device)
    ids[:, prompt] = torch.tensor([gated.safe_token_id, gated.unsafe_token_id] * (batch // 2), device=device)
    labels = ids.clone()
    labels[:, : prompt + 1] = -100
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    casa_batch = dict(
        inputs, labels=labels, prompt_mask=(torch.arange(length, device=device) < prompt).long().expand(batch, -1),
        class_labels=torch.tensor([0, 1] * (batch // 2), device=device),
        safety_index=torch.full((batch,), prompt - 1, device=device),
    )  # fmt: skip
    opt_plain = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-4)
    opt_gated = torch.optim.AdamW([p for p in gated.parameters() if p.requires_grad], lr=1e-4)

    def plain_step() -> None:
        out = lora(**inputs, labels=labels, use_cache=False)
        out.loss.backward()
        opt_plain.step()
        opt_plain.zero_grad()

    def gated_step() -> None:
        loss = casa_loss(gated, casa_batch).loss
        loss.backward()
        opt_gated.step()
        opt_gated.zero_grad()

    result = paired_timing(plain_step, gated_step, pairs, device)
    result["logit_rows"] = {"plain": batch * length, "gated": batch + int((labels[:, 1:] != -100).sum())}
    gated.eval()
    gated.merge_adapter()
    return result
