"""The frozen model's per-prompt tensors that a gate-only fit, calibration and the protocol read.

`cache_prompts` runs the (current) model once over a list of records and keeps, per prompt, what the gate reads at
inference (the tapped states), the raw safe/unsafe logits at the safety step and the last prompt hidden state;
`state_statistics` turns tapped states into the gate's input standardisation. `fit_gate`
(`safegate.training.gate_fit`), `calibrate` and `StateStore` build on them.

Example:
    >>> import safegate
    >>> from safegate.backbones.tiny import tiny_model_and_tokenizer
    >>> model, tok = tiny_model_and_tokenizer("qwen2")
    >>> gated = safegate.attach(model, tok, safegate.GateConfig(attention_dim=16, lora_r=4))
    >>> cache = cache_prompts(gated, [{"prompt": "How do I bake bread?", "label": "safe"}])
    >>> len(cache), tuple(cache.logits.shape)
    (1, (1, 2))
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from safegate.data.records import label_id, load_records
from safegate.modeling.hooks import HiddenStateTap
from safegate.modeling.tokens import padding_id
from safegate.training.collate import build_inputs, concat_model_inputs

__all__ = ["PromptCache", "cache_prompts", "state_statistics"]


@dataclass
class PromptCache:
    """Frozen per-prompt tensors the gate-only fit trains on (all on CPU).

    Attributes:
        states (`list[torch.Tensor]`): Gate input states per prompt, `(T_i, d)` in the model's dtype.
        logits (`torch.Tensor`): Raw `(z_safe, z_unsafe)` at the safety step, `(N, 2)` float32.
        last_hidden (`torch.Tensor`): Final-norm output at the last prompt position, `(N, d)` float32.
        labels (`torch.Tensor`): `1` = unsafe, `(N,)` long.
        seconds (`float`): Time spent building the cache.
    """

    states: list[torch.Tensor]
    logits: torch.Tensor
    last_hidden: torch.Tensor
    labels: torch.Tensor
    seconds: float = 0.0

    def __len__(self) -> int:
        return len(self.states)

    def subset(self, index: torch.Tensor) -> PromptCache:
        """The cached prompts `index` (a view: the state tensors are shared)."""
        index = torch.as_tensor(index, dtype=torch.long)
        return PromptCache(
            states=[self.states[int(i)] for i in index],
            logits=self.logits[index],
            last_hidden=self.last_hidden[index],
            labels=self.labels[index],
        )


@torch.no_grad()
def cache_prompts(
    gated: Any, data: Any, *, batch_size: int = 8, safety_prompt: str | None = None, progress: bool = False
) -> PromptCache:
    """Run the frozen (current) model once over every prompt and keep what the gate-only fit needs.

    Args:
        gated (`SafeGateModel`): The gated model (its current LoRA and token rows are used as they are).
        data: Records (see `safegate.data.records.load_records`; `response` is not needed).
        batch_size (`int`): Prompts per forward.
        safety_prompt (`str | None`): System message to prepend (default: the gate config's `safety_prompt`).
        progress (`bool`): Show a tqdm bar.
    """
    records = [r for r in load_records(data, require_response=False) if r.get("gate", True)]  # `gate: false` rows
    # only condition the answer on their token; they never teach the gate
    if safety_prompt is None:
        safety_prompt = gated.gate_config.safety_prompt
    started = time.perf_counter()
    was_training = gated.training
    gated.eval()
    pad = padding_id(gated.processor)
    states: list[torch.Tensor] = []
    logits, last_hidden, labels = [], [], []
    batches = range(0, len(records), batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="caching prompt states")
    try:
        for start in batches:
            chunk = records[start : start + batch_size]
            built = [build_inputs(gated.processor, {k: v for k, v in r.items() if k != "response"}, safety_prompt)
                     for r in chunk]  # fmt: skip
            lengths = [len(b["prompt_ids"]) for b in built]
            width = max(lengths)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, b in enumerate(built):
                ids[i, : lengths[i]] = torch.tensor(b["prompt_ids"])
                mask[i, : lengths[i]] = 1
            last = torch.tensor(lengths) - 1
            extras = _merge_extras([b["model_inputs"] for b in built])
            device = gated.device
            kwargs = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "use_cache": False, **extras}
            if gated.speculation_support.accepts_logits_to_keep:
                kwargs["logits_to_keep"] = last.unsqueeze(1).to(device)
            with gated.tap() as tap, HiddenStateTap(gated.arch.norm) as norm_tap:
                out = gated(**kwargs)
            step = out.logits[:, 0] if "logits_to_keep" in kwargs else out.logits[torch.arange(len(chunk)), last]
            logits.append(
                torch.stack([step[:, gated.safe_token_id], step[:, gated.unsafe_token_id]], -1).float().cpu()
            )
            rows = torch.arange(len(chunk))
            last_hidden.append(norm_tap.states[rows, last.to(norm_tap.states.device)].float().cpu())
            for i in range(len(chunk)):
                states.append(tap.states[i, : lengths[i]].detach().cpu().clone())
            labels.extend(label_id(r["label"]) for r in chunk)
    finally:
        gated.train(was_training)
    return PromptCache(
        states=states,
        logits=torch.cat(logits),
        last_hidden=torch.cat(last_hidden),
        labels=torch.tensor(labels, dtype=torch.long),
        seconds=time.perf_counter() - started,
    )


def state_statistics(states: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and standard deviation over every token of `states` (float64 sums, one pass)."""
    total = torch.zeros(states[0].shape[-1], dtype=torch.float64)
    square = torch.zeros_like(total)
    count = 0
    for s in states:
        s = s.double()
        total += s.sum(0)
        square += s.pow(2).sum(0)
        count += s.shape[0]
    mean = total / count
    return mean, (square / count - mean.pow(2)).clamp_min(0).sqrt()


def _merge_extras(extras: list[dict[str, Any]]) -> dict[str, Any]:
    return concat_model_inputs(extras) if any(extras) else {}
