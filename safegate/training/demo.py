"""A seconds-long gate-only fit on a tiny built-in Qwen2 with the shipped data: held-out verdicts before/after.

Harmful prompts come from AdvBench and benign ones from the Alpaca seed tasks (`safegate.data.build`); the
backbone is `safegate.backbones.tiny`. Needs the shared data folder (`$SAFEGATE_DATA`).

Example:
    >>> result = demo_gate_training(n_per_class=8, n_heldout=4, epochs=5)
    >>> len(result["before"]), sorted(set(result["labels"]))
    (4, ['safe', 'unsafe'])
"""

from __future__ import annotations

import os
import time
from typing import Any

from safegate.backbones.tiny import tiny_model_and_tokenizer
from safegate.data.build import build_records, split_records
from safegate.data.records import format_prompt
from safegate.evaluation.metrics import auroc
from safegate.modeling.config import GateConfig
from safegate.modeling.model import attach
from safegate.training.gate_fit import fit_gate

__all__ = ["demo_gate_training"]


def demo_gate_training(
    data_dir: str | os.PathLike | None = None,
    *,
    n_per_class: int = 48,
    n_heldout: int = 8,
    epochs: int = 60,
    seed: int = 0,
) -> dict[str, Any]:
    """Fit a gate on a tiny built-in Qwen2 with the shipped data in seconds; held-out verdicts before/after.

    Returns:
        `dict`: `prompts`, `labels` (held-out), `before` / `after` (p(unsafe) lists), `accuracy_before`,
        `accuracy_after`, `auroc_after` (`None` when the held-out set holds one class), `seconds`.
    """
    started = time.perf_counter()
    records = build_records(
        data_dir,
        harmful=["advbench"],
        benign=["alpaca"],
        max_harmful=n_per_class + n_heldout // 2,
        max_benign=n_per_class + n_heldout // 2,
        seed=seed,
    )
    train_records, held = split_records(records, n_heldout, seed=seed)
    model, tok = tiny_model_and_tokenizer("qwen2", seed=seed)
    gated = attach(model, tok, GateConfig(attention_dim=32, lora_r=4, lora_alpha=8))
    prompts = [r["prompt"] for r in held]
    labels = [r["label"] for r in held]
    inputs = tok([format_prompt(tok, p) for p in prompts], return_tensors="pt", padding=True, add_special_tokens=False)
    before = gated.classify(**inputs).tolist()
    fit_gate(gated, train_records, epochs=epochs, lr=1e-2, seed=seed)
    after = gated.classify(**inputs).tolist()
    truth = [label == "unsafe" for label in labels]

    def accuracy(scores: list[float]) -> float:
        return sum((s >= 0.5) == t for s, t in zip(scores, truth)) / len(truth)

    return {
        "prompts": prompts,
        "labels": labels,
        "before": before,
        "after": after,
        "accuracy_before": accuracy(before),
        "accuracy_after": accuracy(after),
        "auroc_after": auroc(after, truth),
        "seconds": time.perf_counter() - started,
    }
