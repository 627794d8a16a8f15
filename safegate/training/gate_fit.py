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
import warnings
from typing import Any

import torch

from safegate.data.records import load_records
from safegate.evaluation.metrics import auroc
from safegate.modeling.gate import gate_pair_logits, unsafe_probability
from safegate.training.gate_opt import GateFitError, optimise
from safegate.training.label_check import label_counts, single_label_message
from safegate.training.objective import class_weighted_mean
from safegate.training.prompt_cache import PromptCache, cache_prompts, state_statistics
from safegate.training.token_rows import trainable_head_rows, write_head_rows

__all__ = [
    "GateFitError", "PromptCache", "cache_prompts", "cached_scores", "fit_gate", "standardize_gate",
    "state_statistics",
]  # fmt: skip


def fit_gate(
    gated: Any,
    data: Any,
    epochs: int = 30,
    lr: float = 3e-3,
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
    val_fraction: float = 0.15,
    warmup: float = 0.1,
    max_grad_norm: float | None = 1.0,
    retries: int = 2,
    standardize: bool = True,
    neutral_start: bool = True,
    train_gate: bool = True,
) -> dict[str, Any]:
    """Fit the gate (and optionally the two head token rows) on frozen prompt states, in seconds.

    The fit cannot silently diverge (`safegate.training.gate_opt`; docs/training.md, "A robust gate fit"): it
    standardises the gate's input on the training prompts' states (unless the gate already has statistics), starts
    the gate's bias so that the untrained token rows' mean offset is neutral, trains with warmup + cosine decay and
    gradient clipping, keeps the best validation state, and retries a diverged run at a quarter of the learning rate
    (twice at most). If no attempt gives a gate that varies across prompts it raises `GateFitError` (with `.stats`)
    and leaves the best state it found in place: nothing downstream can save a dead gate by accident.

    An ensemble (`GateConfig.members = K`) is K such fits, one per member, member k with `seed + k` (its own
    validation split and batch order); the stats then list each under `members`.

    Args:
        gated (`SafeGateModel`): Model whose gate is fitted in place.
        data: Training records (list of dicts, `datasets.Dataset`, JSONL path) or a `PromptCache`.
        epochs (`int`): Passes over the cached prompts.
        lr (`float`): Peak AdamW learning rate (after warmup; divided by 4 on each retry).
        train_token_rows (`bool`): Also fit the safe/unsafe head rows (the embedding rows when tied), using the
            cached last hidden states; the logits must be a plain dot product with the head rows.
        batch_size (`int`): Prompts per optimiser step.
        beta (`float`): Weight of the unsafe class (`beta * L_unsafe + (1 - beta) * L_safe`).
        aux_weight (`float`): Weight of the auxiliary BCE on v_s.
        weight_decay (`float`): AdamW weight decay of the gate.
        eval_data: Held-out records (or a `PromptCache`) scored after fitting.
        seed (`int`): Seed of the validation split and the batch order.
        cache_batch_size (`int`): Prompts per forward while caching.
        safety_prompt (`str | None`): System message (default: the gate config's `safety_prompt`).
        progress (`bool`): Show progress bars.
        val_fraction (`float`): Share of each class held out to pick the best state (only when every class has
            8 validation prompts; otherwise the training prompts themselves are monitored).
        warmup (`float`): Share of the optimiser steps spent in linear warmup.
        max_grad_norm (`float | None`): Gradient-norm clipping (`None`: off).
        retries (`int`): Reruns at a lower learning rate after a divergence.
        standardize (`bool`): Set the gate's input statistics from the training prompts if it has none yet.
        neutral_start (`bool`): On a fresh gate, start the output bias at minus the class-balanced mean of the
            token rows' offset `z_unsafe - z_safe`, so the untrained rows do not start the fit biased.
        train_gate (`bool`): Fit the gate. `False` (with `train_token_rows=True`) fits the two rows alone with the
            gate held constant across prompts (its output weight stays zero; only the neutral-start bias is set):
            the ablation "token rows without safety attention". The divergence check then watches the rows'
            score `z_unsafe - z_safe` instead of the gate logit.

    Returns:
        `dict`: `loss_history` (mean loss per epoch of the kept attempt), `final_loss`, `train_accuracy`,
        `train_auroc` (of the gated pair), `gate_auroc` (of the gate logit alone), `eval_*` likewise (with
        `eval_data`), `diverged`, `lr_used`, `attempts`, `best_epoch`, `val_loss`, `n_val`, `ok`,
        `cache_seconds`, `fit_seconds`, `n_train`, `n_eval`.

    Raises:
        `GateFitError`: Every attempt diverged and the best state is a gate that does not vary across prompts.

    Example (the module docstring runs one on a tiny model):
        stats = fit_gate(gated, "train.jsonl", epochs=20)                            # the gate (default)
        stats = fit_gate(gated, "train.jsonl", train_token_rows=True, train_gate=False)  # the two rows alone
    """
    _check_fit_args(epochs, lr, beta, aux_weight, batch_size)
    if not train_gate and not train_token_rows:
        raise ValueError(
            "fit_gate: `train_gate=False` with `train_token_rows=False` leaves nothing to fit. Pass "
            "`train_token_rows=True` to fit the two token rows alone, or keep `train_gate=True`."
        )
    if not train_gate and aux_weight:
        raise ValueError(
            f"fit_gate: `aux_weight={aux_weight!r}` needs a trained gate (the auxiliary loss is on the gate's "
            "output), but `train_gate=False`. Set `aux_weight=0.0`."
        )
    if train_token_rows and train_gate and gated.gate_config.members > 1:
        raise ValueError(f"fit_gate: `train_token_rows=True` with `GateConfig.members={gated.gate_config.members}`: "
                         "members are fitted one by one, so the shared rows would end as the last one's fit. Set "
                         "`train_token_rows=False` (joint training still trains the rows), or members=1.")  # fmt: skip
    if not train_gate and not gated.gate.is_fresh():
        raise ValueError(
            "fit_gate: `train_gate=False` holds the gate constant, but this gate is already trained (its output "
            "weight is not zero), so it would not be constant across prompts. Attach a fresh gate first."
        )
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"`val_fraction` must be in [0, 1), got {val_fraction!r}.")
    # ---- issue 17: single-class data (AUROC undefined, the gate learns a constant) is named before caching
    if not isinstance(data, PromptCache):
        data = load_records(data, require_response=False)
    counts = (
        {"safe": int((data.labels == 0).sum()), "unsafe": int((data.labels == 1).sum())}
        if isinstance(data, PromptCache)
        else label_counts(data)
    )
    single = single_label_message(counts, "fit_gate data")
    if single:
        warnings.warn(f"{single} AUROC is undefined, so no train_auroc is reported.", UserWarning, stacklevel=2)
    # ---- end of the single-class check
    cache = (
        data
        if isinstance(data, PromptCache)
        else cache_prompts(gated, data, batch_size=cache_batch_size, safety_prompt=safety_prompt, progress=progress)
    )
    gate = gated.gate
    device = next(gate.parameters()).device
    if standardize and not gate.has_input_stats():
        gate.set_input_stats(*state_statistics(cache.states))
    rows = trainable_head_rows(gated, cache.last_hidden, cache.logits) if train_token_rows else None
    biases = [b for name, b in gate.named_parameters() if name.endswith("out.bias")]  # one per member
    if neutral_start and gate.is_fresh() and not any(bool(b.any()) for b in biases):
        _neutral_bias(gated, cache, rows, beta)
    # an ensemble's members are fitted one after another, member k with seed + k: its own validation split and
    # batch order (members sharing them end up near-identical: docs/generalization.md, "An ensemble of gates")
    members = list(gate.members) if train_gate and hasattr(gate, "members") else [gate]
    started = time.perf_counter()
    was_training = gate.training
    gate.train()
    fits = []
    try:
        for k, member in enumerate(members):
            gate_params = [p for p in member.parameters() if p.requires_grad] if train_gate else []
            params = gate_params + ([rows[0]] if rows is not None else [])

            def pair(index: torch.Tensor, member: Any = member) -> tuple[torch.Tensor, torch.Tensor]:
                logits, gate_logit = _gated_pair(gated, cache, index, device, rows, member)
                # with the gate held constant, what must vary across prompts (and not collapse) is the rows' score
                return (logits, gate_logit) if train_gate else (logits, logits[:, 1] - logits[:, 0])

            fits.append(optimise(
                params, pair, cache.labels, epochs=epochs, lr=lr, batch_size=batch_size, beta=beta,
                aux_weight=aux_weight, weight_decay=weight_decay, seed=seed + k, val_fraction=val_fraction,
                warmup=warmup, max_grad_norm=max_grad_norm, retries=retries,
            ))  # fmt: skip
    finally:
        gate.train(was_training)
    fit = next((f for f in fits if not f["ok"]), fits[0])  # the first failed member's fit, else the first one's
    if rows is not None:
        write_head_rows(gated, rows)
    history = fit["loss_history"]
    stats: dict[str, Any] = {
        **fit,
        "final_loss": history[-1] if history else None,
        "cache_seconds": cache.seconds,
        "fit_seconds": time.perf_counter() - started,
        "n_train": len(cache),
        "train_token_rows": bool(train_token_rows),
        "train_gate": bool(train_gate),
    }
    if len(fits) > 1:
        keys = ("lr_used", "best_epoch", "val_loss", "diverged", "ok")
        stats["members"] = [{key: f[key] for key in keys} for f in fits]
        stats["diverged"] = any(f["diverged"] for f in fits)
    stats.update(_scores(gated, cache, "train", rows))
    if not fit["ok"]:
        raise GateFitError(
            f"fit_gate: no attempt gave a gate that varies across prompts (learning rates "
            f"{[a['lr'] for a in fit['attempts']]}; {fit['attempts'][-1]['diverged']}). The best state found is "
            "left in place; do not save it. Lower `lr`, add `epochs`, or check the data (both classes, enough "
            "prompts) and `GateConfig.layer`.",
            stats,
        )
    if eval_data is not None:
        held = (
            eval_data
            if isinstance(eval_data, PromptCache)
            else cache_prompts(gated, eval_data, batch_size=cache_batch_size, safety_prompt=safety_prompt)
        )
        stats.update(_scores(gated, held, "eval", rows))  # the fitted rows, also for a cache made before the fit
        stats["n_eval"] = len(held)
    return stats


def standardize_gate(gated: Any, data: Any, *, max_prompts: int = 64, safety_prompt: str | None = None) -> None:
    """Set the gate's input statistics from the tapped states of the first `max_prompts` prompts of `data`.

    What `safegate.train` does before its first step when the gate has no statistics yet (`fit_gate` sets them
    from all its prompts): one frozen forward over a few dozen prompts.
    """
    records = load_records(data, require_response=False)[:max_prompts]
    if records:
        # one prompt per forward: no padding, and multimodal inputs of different lengths need no merging
        cache = cache_prompts(gated, records, batch_size=1, safety_prompt=safety_prompt)
        gated.gate.set_input_stats(*state_statistics(cache.states))


@torch.no_grad()
def cached_scores(
    gated: Any, cache: PromptCache, rows: tuple | None = None, *, with_gate: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """p(unsafe) of every cached prompt under the current gate, `(N,)` (and the gate logits with `with_gate`).

    The cached safety-step logits are used as they are, unless `rows` (head rows, bias) recompute them.
    """
    device = next(gated.gate.parameters()).device
    was_training = gated.gate.training
    gated.gate.eval()
    out, logits = [], []
    for start in range(0, len(cache), 64):
        index = torch.arange(start, min(start + 64, len(cache)))
        pair, gate_logit = _gated_pair(gated, cache, index, device, rows)
        out.append(unsafe_probability(pair[:, 0], pair[:, 1]).cpu())
        logits.append(gate_logit.float().cpu())
    gated.gate.train(was_training)
    return (torch.cat(out), torch.cat(logits)) if with_gate else torch.cat(out)


# ------------------------------------------------------------------------------------------------ helpers
def _gated_pair(
    gated: Any,
    cache: PromptCache,
    index: torch.Tensor,
    device: torch.device,
    rows: tuple | None,
    gate: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated pair `(B, 2)` and gate logit `(B,)` under `gate` (default `gated.gate`; or one member of it)."""
    states = [cache.states[int(i)] for i in index]
    width = max(s.shape[0] for s in states)
    hidden = torch.zeros(len(states), width, states[0].shape[-1], dtype=torch.float32, device=device)
    mask = torch.zeros(len(states), width, dtype=torch.long, device=device)
    for i, s in enumerate(states):
        hidden[i, : s.shape[0]] = s.to(device=device, dtype=torch.float32)
        mask[i, : s.shape[0]] = 1
    gate_logit = (gated.gate if gate is None else gate)(hidden, mask)
    if rows is None:
        z = cache.logits[index].to(device)
    else:
        weight, bias = rows
        z = cache.last_hidden[index].to(device) @ weight.float().t()
        if bias is not None:
            z = z + bias
    z_safe, z_unsafe = gate_pair_logits(z[:, 0], z[:, 1], gate_logit, gated.gate_config.scaling)
    return torch.stack([z_safe, z_unsafe], -1), gate_logit


@torch.no_grad()
def _neutral_bias(gated: Any, cache: PromptCache, rows: tuple | None, beta: float) -> None:
    """Start the gate's output bias at minus the class-balanced mean offset `z_unsafe - z_safe` of the rows."""
    if rows is None:
        z = cache.logits
    else:
        z = cache.last_hidden @ rows[0].detach().float().cpu().t() + (0 if rows[1] is None else rows[1].cpu())
    offset = (z[:, 1] - z[:, 0]).float()
    both = bool(cache.labels.any() and not cache.labels.all())
    mean = class_weighted_mean(offset, cache.labels, beta) if both else offset.mean()
    gated.gate.set_output_bias(-float(mean))


@torch.no_grad()
def _scores(gated: Any, cache: PromptCache, prefix: str, rows: tuple | None = None) -> dict[str, float]:
    scores, gate_logits = cached_scores(gated, cache, rows, with_gate=True)
    labels = cache.labels
    out = {f"{prefix}_accuracy": float(((scores >= 0.5).long() == labels).float().mean())}
    score = auroc(scores, labels)
    if score is not None:  # `None`: the cached prompts hold one class only
        out[f"{prefix}_auroc"] = score
        # the gate alone: untrained or inverted token rows cannot hide a dead gate behind the pair's score
        out["gate_auroc" if prefix == "train" else f"{prefix}_gate_auroc"] = auroc(gate_logits, labels)
    return out


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
