"""Training examples: records encoded for `CASACollator`, and p(unsafe) read through the training path.

`encode_records` turns validated records into the examples `CASATrainer` batches (skipping, with a warning,
prompts longer than `max_length`: prompts are never cut). `prompt_scores` runs those examples right-padded through
the CASA objective and returns p(unsafe); it matches `gated.classify` (left-padded inference) up to float noise.

Example:
    >>> import safegate
    >>> from safegate.backbones.tiny import tiny_model_and_tokenizer
    >>> gated = safegate.attach(*tiny_model_and_tokenizer("qwen2"), safegate.GateConfig(attention_dim=16, lora_r=4))
    >>> records = [{"prompt": "Bake bread?", "response": "Sure.", "label": "safe"}]
    >>> examples, skipped = encode_records(gated, records)
    >>> len(examples), skipped, prompt_scores(gated, records).shape
    (1, 0, torch.Size([1]))
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from safegate.data.records import load_records
from safegate.modeling.tokens import padding_id
from safegate.training.collate import CASACollator, encode_record
from safegate.training.objective import casa_loss

__all__ = ["encode_records", "prompt_scores"]


def encode_records(
    gated: Any,
    records: list[dict[str, Any]],
    *,
    method: str = "casa",
    safety_prompt: str | None = None,
    max_length: int | None = None,
) -> tuple[list[dict[str, Any]], int]:
    """Encode validated records for `CASACollator`; returns `(examples, number skipped as too long)`."""
    examples, skipped = [], 0
    for record in records:
        example = encode_record(
            gated.processor,
            record,
            safe_id=gated.safe_token_id,
            unsafe_id=gated.unsafe_token_id,
            method=method,
            safety_prompt=safety_prompt,
            max_length=max_length,
        )
        if example is None:
            skipped += 1
        else:
            examples.append(example)
    if skipped:
        warnings.warn(
            f"{skipped} record(s) skipped: their prompt is longer than max_length={max_length} "
            "(prompts are never truncated: the gate must read all of them).",
            stacklevel=3,
        )
    return examples, skipped


@torch.no_grad()
def prompt_scores(
    gated: Any,
    data: Any,
    *,
    method: str = "casa",
    batch_size: int = 8,
    safety_prompt: str | None = None,
) -> torch.Tensor:
    """p(unsafe) of each record computed by the training path (right-padded, one forward with the response).

    Equals `gated.classify` on the same prompt (left-padded inference) up to float noise.
    """
    if safety_prompt is None:
        safety_prompt = gated.gate_config.safety_prompt
    records = load_records(data, require_response=False)
    examples, _ = encode_records(gated, records, method=method, safety_prompt=safety_prompt)
    collator = CASACollator(padding_id(gated.processor))
    was_training = gated.training
    gated.eval()
    try:
        scores = []
        for start in range(0, len(examples), batch_size):
            batch = collator(examples[start : start + batch_size])
            batch = {k: v.to(gated.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            scores.append(casa_loss(gated, batch, method=method).p_unsafe.cpu())
    finally:
        gated.train(was_training)
    return torch.cat(scores)
