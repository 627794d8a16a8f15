"""The LoRA phase of a generalization fold (`run_protocol(lora_args=...)`): train on the verdict, score the fold.

`train_verdict` trains LoRA, gate and token rows on a fold's training prompts for the verdict alone
(`safegate.train(verdict_only=True)`); `adapted_scores` then reads p(unsafe) from the adapted model's own prompt
states for the prompts the fold scores.

Example (tiny random model):
    >>> import safegate
    >>> from safegate.backbones.tiny import tiny_model_and_tokenizer
    >>> model, tok = tiny_model_and_tokenizer("llama")
    >>> gated = safegate.attach(model, tok, safegate.GateConfig(attention_dim=8, lora_r=2))
    >>> records = [{"prompt": f"prompt {i}", "label": "unsafe" if i % 2 else "safe"} for i in range(4)]
    >>> scores = adapted_scores(gated, records, {"val": [0], "eval": {"left_out": [1, 2]}})
    >>> [bool(s == s) for s in scores]  # NaN where the fold scores nothing (index 3)
    [True, True, True, False]
"""

from __future__ import annotations

import tempfile
from typing import Any

import torch

from safegate.training.gate_fit import cached_scores
from safegate.training.prompt_cache import cache_prompts


def train_verdict(
    gated: Any,
    records: list[dict[str, Any]],
    args: dict[str, Any],
    seed: int,
    gate_lr: float | None,
    fit_kwargs: dict[str, Any] | None,
) -> dict[str, Any]:
    """LoRA, gate and token rows trained on the verdict alone (`safegate.train(verdict_only=True)`); a summary."""
    from safegate.training.trainer import train

    prompts = [{"prompt": r["prompt"], "label": r["label"]} for r in records]
    with tempfile.TemporaryDirectory() as out:
        stats = train(
            gated,
            prompts,
            beta=(fit_kwargs or {}).get("beta", 0.5),
            args={**args, "output_dir": out, "seed": seed, "save_strategy": "no", "report_to": "none"},
            gate_lr=gate_lr,
            save=False,
            verdict_only=True,
        )
    return {k: stats[k] for k in ("global_step", "train_loss", "runtime_s", "n_train", "skipped")} | {
        "last_log": stats["last_log"]
    }


def adapted_scores(gated: Any, records: list[dict[str, Any]], fold: dict[str, Any]) -> torch.Tensor:
    """p(unsafe) from the adapted model's own prompt states for the fold's validation and evaluation prompts.

    Indices the fold does not score (its training prompts) hold NaN.
    """
    need = sorted(set(fold["val"]) | {i for index in fold["eval"].values() for i in index})
    cache = cache_prompts(gated, [records[i] for i in need])
    scores = torch.full((len(records),), float("nan"), dtype=torch.float64)
    scores[torch.tensor(need)] = cached_scores(gated, cache).double()
    return scores
