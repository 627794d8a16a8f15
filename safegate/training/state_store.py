"""On-disk cache of prompt states for repeated gate fits (`StateStore`), and helpers to join and slice caches.

`cache_prompts` runs the frozen model once over a list of records; `StateStore.get` keeps that result as one
`torch.save` file of tensors (no pickled objects) keyed by model, gate layer, safety prompt and prompts, so a protocol
re-run after a gate or fit change only re-fits (`safegate.training.generalization`).

Example (tiny random model):
    >>> import safegate, tempfile
    >>> from safegate.backbones.tiny import tiny_model_and_tokenizer
    >>> model, tok = tiny_model_and_tokenizer("llama")
    >>> gated = safegate.attach(model, tok, safegate.GateConfig(attention_dim=8, lora_r=2))
    >>> store = StateStore(tempfile.mkdtemp())
    >>> records = [{"prompt": "hello", "label": "safe"}, {"prompt": "build a bomb", "label": "unsafe"}]
    >>> first, again = store.get(gated, records, "tiny"), store.get(gated, records, "tiny")
    >>> (store.misses, store.hits), torch.equal(first.labels, again.labels), len(subset_cache(first, [1]).states)
    ((1, 1), True, 1)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from safegate.training.prompt_cache import PromptCache, cache_prompts


class StateStore:
    """On-disk cache of `cache_prompts` results, one `torch.save` file of tensors per key (no pickled objects)."""

    def __init__(self, folder: str | Path | None) -> None:
        self.folder = Path(folder) if folder is not None else None
        self.hits = self.misses = 0

    @staticmethod
    def key(model_name: str, layer: int, safety_prompt: str | None, records: list[dict[str, Any]]) -> str:
        payload = [model_name, layer, safety_prompt, [[r["prompt"], r["label"]] for r in records]]
        return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:24]

    def get(self, gated: Any, records: list[dict[str, Any]], model_name: str, progress: bool = False) -> PromptCache:
        config = gated.gate_config
        path = None
        if self.folder is not None:
            path = self.folder / f"{self.key(model_name, config.layer, config.safety_prompt, records)}.pt"
            if path.exists():
                self.hits += 1
                saved = torch.load(path, weights_only=True)
                return PromptCache(saved["states"], saved["logits"], saved["last_hidden"], saved["labels"], 0.0)
        self.misses += 1
        cache = cache_prompts(gated, records, progress=progress)
        if path is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            tensors = {"states": cache.states, "logits": cache.logits, "last_hidden": cache.last_hidden,
                       "labels": cache.labels}  # fmt: skip
            torch.save(tensors, path.with_suffix(".tmp"))
            path.with_suffix(".tmp").replace(path)
        return cache


def concat_caches(caches: list[PromptCache]) -> PromptCache:
    """One cache holding the prompts of `caches` in order."""
    return PromptCache(
        states=[s for c in caches for s in c.states],
        logits=torch.cat([c.logits for c in caches]),
        last_hidden=torch.cat([c.last_hidden for c in caches]),
        labels=torch.cat([c.labels for c in caches]),
        seconds=sum(c.seconds for c in caches),
    )


def subset_cache(cache: PromptCache, index: list[int]) -> PromptCache:
    """The prompts `index` of `cache`, in that order."""
    rows = torch.tensor(index, dtype=torch.long)
    return PromptCache([cache.states[i] for i in index], cache.logits[rows], cache.last_hidden[rows],
                       cache.labels[rows], 0.0)  # fmt: skip
