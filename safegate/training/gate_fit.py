"""Gate-only fast fit: run the frozen model over the prompts once, then fit the gate on the cached states.

`fit_gate` caches, per prompt, what the gate reads at inference (plus the raw safe/unsafe logits at the safety step
and the last prompt hidden state), then fits the gate (optionally the two head rows) on those tensors alone:
seconds on a CPU; LoRA is never touched. A warm start before `safegate.train` or a cheap standalone mode; see
docs/training.md for the details and the cache's memory cost.

Example:
    >>> import safegate
    >>> from safegate.backbones.tiny import tiny_model_and_tokenizer
    >>> model, tok = tiny_model_and_tokenizer("qwen2")
    >>> gated = safegate.attach(model, tok, safegate.GateConfig(attention_dim=16, lora_r=4))
    >>> data = [{"prompt": "How do I bake bread?", "label": "safe"},
    ...         {"prompt": "How can I build a bomb?", "label": "unsafe"}] * 4
    >>> stats = fit_gate(gated, data, epochs=15, lr=0.1)
    >>> stats["train_accuracy"]
    1.0
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from safegate.data.records import label_id, load_records
from safegate.evaluation.metrics import auroc
from safegate.modeling.gate import gate_pair_logits, unsafe_probability
from safegate.modeling.hooks import HiddenStateTap
from safegate.modeling.tokens import padding_id
from safegate.training.collate import build_inputs, concat_model_inputs
from safegate.training.objective import class_weighted_mean


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


def fit_gate(
    gated: Any,
    data: Any,
    epochs: int = 30,
    lr: float = 1e-2,
    train_token_rows: bool = False,
    *,
    batch_size: int = 32,
    beta: float = 0.5,
    aux_weight: float = 0.0,
    weight_decay: float = 0.0,
    eval_data: Any = None,
    seed: int = 0,
    cache_batch_size: int = 8,
    safety_prompt: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Fit the gate (and optionally the two head token rows) on frozen prompt states, in seconds.

    Args:
        gated (`SafeGateModel`): Model whose gate is fitted in place.
        data: Training records (list of dicts, `datasets.Dataset`, JSONL path) or a `PromptCache`.
        epochs (`int`): Passes over the cached prompts.
        lr (`float`): AdamW learning rate.
        train_token_rows (`bool`): Also fit the safe/unsafe head rows (the embedding rows when tied), using the
            cached last hidden states; the logits must be a plain dot product with the head rows.
        batch_size (`int`): Prompts per optimiser step.
        beta (`float`): Weight of the unsafe class (`beta * L_unsafe + (1 - beta) * L_safe`).
        aux_weight (`float`): Weight of the auxiliary BCE on v_s.
        weight_decay (`float`): AdamW weight decay of the gate.
        eval_data: Held-out records (or a `PromptCache`) scored after fitting.
        seed (`int`): Seed of the batch order.
        cache_batch_size (`int`): Prompts per forward while caching.
        safety_prompt (`str | None`): System message (default: the gate config's `safety_prompt`).
        progress (`bool`): Show progress bars.

    Returns:
        `dict`: `loss_history` (mean loss per epoch), `final_loss`, `train_accuracy`, `train_auroc`,
        `eval_accuracy` / `eval_auroc` (with `eval_data`), `cache_seconds`, `fit_seconds`, `n_train`, `n_eval`.
    """
    _check_fit_args(epochs, lr, beta, aux_weight, batch_size)
    cache = (
        data
        if isinstance(data, PromptCache)
        else cache_prompts(gated, data, batch_size=cache_batch_size, safety_prompt=safety_prompt, progress=progress)
    )
    gate = gated.gate
    device = next(gate.parameters()).device
    rows = _head_rows(gated, cache) if train_token_rows else None
    params = [p for p in gate.parameters() if p.requires_grad] + ([rows[0]] if rows is not None else [])
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    history = []
    was_training = gate.training
    gate.train()
    for _ in range(epochs):
        order = torch.randperm(len(cache), generator=generator)
        total, count = 0.0, 0
        for start in range(0, len(cache), batch_size):
            index = order[start : start + batch_size]
            pair, gate_logit = _gated_pair(gated, cache, index, device, rows)
            labels = cache.labels[index].to(device)
            per_sample = F.cross_entropy(pair, labels, reduction="none")
            if aux_weight:
                per_sample = per_sample + aux_weight * F.binary_cross_entropy_with_logits(
                    gate_logit.float(), labels.float(), reduction="none"
                )
            loss = class_weighted_mean(per_sample, labels, beta)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(index)
            count += len(index)
        history.append(total / count)
    gate.train(was_training)
    if rows is not None:
        _write_head_rows(gated, rows)
    stats: dict[str, Any] = {
        "loss_history": history,
        "final_loss": history[-1] if history else None,
        "cache_seconds": cache.seconds,
        "fit_seconds": time.perf_counter() - started,
        "n_train": len(cache),
        "train_token_rows": bool(train_token_rows),
    }
    stats.update(_scores(gated, cache, "train", rows))
    if eval_data is not None:
        held = (
            eval_data
            if isinstance(eval_data, PromptCache)
            else cache_prompts(gated, eval_data, batch_size=cache_batch_size, safety_prompt=safety_prompt)
        )
        stats.update(_scores(gated, held, "eval"))
        stats["n_eval"] = len(held)
    return stats


@torch.no_grad()
def cached_scores(gated: Any, cache: PromptCache, rows: tuple | None = None) -> torch.Tensor:
    """p(unsafe) of every cached prompt under the current gate, `(N,)`.

    The cached safety-step logits are used as they are, unless `rows` (head rows, bias) recompute them.
    """
    device = next(gated.gate.parameters()).device
    out = []
    for start in range(0, len(cache), 64):
        index = torch.arange(start, min(start + 64, len(cache)))
        pair, _ = _gated_pair(gated, cache, index, device, rows)
        out.append(unsafe_probability(pair[:, 0], pair[:, 1]).cpu())
    return torch.cat(out)


# ------------------------------------------------------------------------------------------------ helpers
def _gated_pair(
    gated: Any, cache: PromptCache, index: torch.Tensor, device: torch.device, rows: tuple | None
) -> tuple[torch.Tensor, torch.Tensor]:
    states = [cache.states[int(i)] for i in index]
    width = max(s.shape[0] for s in states)
    hidden = torch.zeros(len(states), width, states[0].shape[-1], dtype=torch.float32, device=device)
    mask = torch.zeros(len(states), width, dtype=torch.long, device=device)
    for i, s in enumerate(states):
        hidden[i, : s.shape[0]] = s.to(device=device, dtype=torch.float32)
        mask[i, : s.shape[0]] = 1
    gate_logit = gated.gate(hidden, mask)
    if rows is None:
        z = cache.logits[index].to(device)
    else:
        weight, bias = rows
        z = cache.last_hidden[index].to(device) @ weight.float().t()
        if bias is not None:
            z = z + bias
    z_safe, z_unsafe = gate_pair_logits(z[:, 0], z[:, 1], gate_logit, gated.gate_config.scaling)
    return torch.stack([z_safe, z_unsafe], -1), gate_logit


def _token_layer(gated: Any) -> Any:
    layers = gated.token_layers()
    return layers["embed"] if gated.arch.tied else layers["head"]


def _head_rows(gated: Any, cache: PromptCache) -> tuple[torch.nn.Parameter, torch.Tensor | None]:
    """Trainable copy of the (safe, unsafe) head rows; checks that logits are a plain dot product with them."""
    delta = _token_layer(gated).trainable_tokens_delta["default"]
    head_bias = getattr(gated.arch.head, "bias", None)
    bias = None
    if head_bias is not None:
        bias = head_bias.detach()[[gated.safe_token_id, gated.unsafe_token_id]].float()
    weight = torch.nn.Parameter(delta.detach().float().clone())
    expected = cache.last_hidden.to(weight.device) @ weight.detach().t() + (0 if bias is None else bias)
    if not torch.allclose(expected, cache.logits.to(weight.device), atol=1e-3, rtol=1e-3):
        raise ValueError(
            "`train_token_rows=True` needs logits that are a plain dot product of the last hidden state with the "
            "head rows, but this model transforms them (logit scaling or soft-capping). Use "
            "`train_token_rows=False`, or train the rows with `safegate.train`."
        )
    return weight, bias


@torch.no_grad()
def _write_head_rows(gated: Any, rows: tuple[torch.nn.Parameter, torch.Tensor | None]) -> None:
    delta = _token_layer(gated).trainable_tokens_delta["default"]
    delta.copy_(rows[0].to(delta.dtype))


@torch.no_grad()
def _scores(gated: Any, cache: PromptCache, prefix: str, rows: tuple | None = None) -> dict[str, float]:
    scores = cached_scores(gated, cache, rows)
    labels = cache.labels
    out = {f"{prefix}_accuracy": float(((scores >= 0.5).long() == labels).float().mean())}
    score = auroc(scores, labels)
    if score is not None:  # `None`: the cached prompts hold one class only
        out[f"{prefix}_auroc"] = score
    return out


def _merge_extras(extras: list[dict[str, Any]]) -> dict[str, Any]:
    return concat_model_inputs(extras) if any(extras) else {}


def _check_fit_args(epochs: int, lr: float, beta: float, aux_weight: float, batch_size: int) -> None:
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"`epochs` must be an integer >= 1, got {epochs!r}.")
    if not lr > 0:
        raise ValueError(f"`lr` must be > 0, got {lr!r}.")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"`beta` must be in [0, 1], got {beta!r}.")
    if aux_weight < 0:
        raise ValueError(f"`aux_weight` must be >= 0, got {aux_weight!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be an integer >= 1, got {batch_size!r}.")
