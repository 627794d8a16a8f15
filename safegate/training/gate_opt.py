"""The optimiser loop of `fit_gate`: a gate fit that cannot silently diverge.

One *attempt* trains the gate (and optionally the two token rows) on a stratified fit split with AdamW, linear
warmup then cosine decay, gradient-norm clipping, and keeps the state with the best validation loss. An attempt
*diverges* when a loss is not finite, when an epoch's training loss rises above `DIVERGENCE_RATIO` x the initial
loss, or when the gate collapses to a constant (the standard deviation of the gate logit across the validation
prompts falls below `CONSTANT_GATE_STD` after having been above it: the attention saturated on a position every
prompt shares). A diverged attempt is retried from the starting state at a quarter of the learning rate, at most
`retries` times. `docs/training.md` ("A robust gate fit") says why each guard is there.

Example:
    >>> import torch
    >>> labels = torch.tensor([0, 1] * 8)
    >>> split_indices(labels, 0.25, seed=0)[1].tolist()  # too few per class: no validation split
    []
    >>> [len(part) for part in split_indices(torch.tensor([0, 1] * 40), 0.25, seed=0)]
    [60, 20]
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from safegate.training.objective import class_weighted_mean

DIVERGENCE_RATIO = 1.5
CONSTANT_GATE_STD = 1e-3
MIN_VALIDATION_PER_CLASS = 8
LR_DECAY_ON_RETRY = 4.0

PairFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""`index -> (gated pair logits (n, 2), gate logit (n,))` for cached prompts `index`."""


class GateFitError(RuntimeError):
    """`fit_gate` could not fit a gate that varies across prompts (every attempt diverged); `.stats` says how."""

    def __init__(self, message: str, stats: dict[str, Any]) -> None:
        super().__init__(message)
        self.stats = stats


@dataclass
class Attempt:
    """One optimisation run at one learning rate."""

    lr: float
    diverged: str | None = None
    best_epoch: int = -1
    best_loss: float = math.inf
    initial_loss: float = math.nan
    gate_std: float = 0.0
    history: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "lr": self.lr,
            "diverged": self.diverged,
            "best_epoch": self.best_epoch,
            "best_val_loss": self.best_loss,
            "initial_loss": self.initial_loss,
            "gate_std": self.gate_std,
            "epochs_run": len(self.history),
        }


def split_indices(labels: torch.Tensor, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified (fit, validation) index split; none unless every class gives 8 validation prompts.

    A smaller validation set picks its "best" epoch by noise (often the first one), so below that the training
    prompts themselves are monitored.
    """
    counts = [int((labels == c).sum()) for c in (0, 1)]
    everything = torch.arange(len(labels))
    if val_fraction <= 0 or min(counts) * val_fraction < MIN_VALIDATION_PER_CLASS:
        return everything, everything[:0]
    generator = torch.Generator().manual_seed(seed)
    held = torch.zeros(len(labels), dtype=torch.bool)
    for c in (0, 1):
        members = everything[labels == c]
        members = members[torch.randperm(len(members), generator=generator)]
        held[members[: max(1, round(val_fraction * len(members)))]] = True
    return everything[~held], everything[held]


def optimise(
    params: list[torch.nn.Parameter],
    pair: PairFn,
    labels: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    beta: float,
    aux_weight: float,
    weight_decay: float,
    seed: int,
    val_fraction: float,
    warmup: float,
    max_grad_norm: float | None,
    retries: int,
) -> dict[str, Any]:
    """Fit `params` (gate and token rows, changed in place) with retries; return what happened.

    Returns:
        `dict`: `loss_history` (of the kept attempt), `attempts` (one summary each), `diverged` (any attempt),
        `lr_used`, `best_epoch`, `val_loss` (`None` without a validation split), `n_val`, `ok` (the kept state is
        a gate that varies across prompts and beats its starting loss).
    """
    fit_idx, val_idx = split_indices(labels, val_fraction, seed)
    monitor = val_idx if len(val_idx) else fit_idx
    two_classes = bool((labels[monitor] == 0).any() and (labels[monitor] == 1).any())
    start = _snapshot(params)

    def per_sample(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pair_logits, gate_logit = pair(index)
        y = labels[index].to(pair_logits.device)
        losses = F.cross_entropy(pair_logits.float(), y, reduction="none")
        if aux_weight:
            losses = losses + aux_weight * F.binary_cross_entropy_with_logits(
                gate_logit.float(), y.float(), reduction="none"
            )
        return losses, gate_logit, y

    def loss_of(index: torch.Tensor) -> torch.Tensor:
        losses, _, y = per_sample(index)
        return class_weighted_mean(losses, y, beta)

    @torch.no_grad()
    def evaluate(index: torch.Tensor) -> tuple[float, float]:
        """(class-weighted loss, std of the gate logit) over `index`, in chunks."""
        chunks = [per_sample(index[at : at + 64]) for at in range(0, len(index), 64)]
        x = torch.cat([c[1].float().cpu() for c in chunks])
        loss = float(class_weighted_mean(torch.cat([c[0].cpu() for c in chunks]), labels[index], beta))
        return loss, float(x.std()) if len(x) > 1 else 0.0

    attempts: list[Attempt] = []
    kept: tuple[Attempt, list[torch.Tensor]] | None = None
    for number in range(retries + 1):
        _restore(params, start)
        attempt = Attempt(lr=lr / LR_DECAY_ON_RETRY**number)
        best = _run(attempt, params, loss_of, evaluate, fit_idx, monitor, two_classes, epochs=epochs,
                    batch_size=batch_size, weight_decay=weight_decay, seed=seed + number, warmup=warmup,
                    max_grad_norm=max_grad_norm)  # fmt: skip
        attempts.append(attempt)
        if kept is None or (attempt.diverged is None) or attempt.best_loss < kept[0].best_loss:
            kept = (attempt, best)
        if attempt.diverged is None:
            break
    assert kept is not None
    attempt, best = kept
    _restore(params, best)
    learned = not two_classes or attempt.gate_std >= CONSTANT_GATE_STD
    return {
        "loss_history": attempt.history,
        "attempts": [a.summary() for a in attempts],
        "diverged": any(a.diverged for a in attempts),
        "lr_used": attempt.lr,
        "best_epoch": attempt.best_epoch,
        "val_loss": attempt.best_loss if len(val_idx) else None,
        "n_val": len(val_idx),
        "ok": bool(learned),
    }


def _run(
    attempt: Attempt,
    params: list[torch.nn.Parameter],
    loss_of: Callable[[torch.Tensor], torch.Tensor],
    evaluate: Callable[[torch.Tensor], tuple[float, float]],
    fit_idx: torch.Tensor,
    monitor: torch.Tensor,
    two_classes: bool,
    *,
    epochs: int,
    batch_size: int,
    weight_decay: float,
    seed: int,
    warmup: float,
    max_grad_norm: float | None,
) -> list[torch.Tensor]:
    """One attempt; fills `attempt` and returns the best state's tensors (the starting state if nothing beat it)."""
    optimizer = torch.optim.AdamW(params, lr=attempt.lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(fit_idx) / batch_size)
    warm = max(1, int(warmup * steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    generator = torch.Generator().manual_seed(seed)
    attempt.initial_loss = evaluate(fit_idx)[0]
    attempt.best_loss, attempt.gate_std = evaluate(monitor)
    best = _snapshot(params)
    widest = attempt.gate_std
    for epoch in range(epochs):
        order = fit_idx[torch.randperm(len(fit_idx), generator=generator)]
        total, count = 0.0, 0
        for at in range(0, len(order), batch_size):
            index = order[at : at + batch_size]
            loss = loss_of(index)
            if not torch.isfinite(loss):
                attempt.diverged = f"non-finite loss in epoch {epoch}"
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            scheduler.step()
            total += float(loss.detach()) * len(index)
            count += len(index)
        if attempt.diverged:
            break
        attempt.history.append(total / count)
        if attempt.history[-1] > DIVERGENCE_RATIO * attempt.initial_loss:
            attempt.diverged = f"loss {attempt.history[-1]:.3g} > {DIVERGENCE_RATIO} x initial in epoch {epoch}"
            break
        loss, std = evaluate(monitor)
        if not math.isfinite(loss):
            attempt.diverged = f"non-finite validation loss in epoch {epoch}"
            break
        widest = max(widest, std)
        if two_classes and widest >= 10 * CONSTANT_GATE_STD and std < CONSTANT_GATE_STD:
            attempt.diverged = f"the gate collapsed to a constant in epoch {epoch} (attention saturated)"
            break
        if loss < attempt.best_loss:
            attempt.best_loss, attempt.best_epoch, attempt.gate_std = loss, epoch, std
            best = _snapshot(params)
    if not attempt.diverged and two_classes and attempt.gate_std < CONSTANT_GATE_STD:
        attempt.diverged = "the gate stayed constant across prompts (it never learned)"
    return best


def _snapshot(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


@torch.no_grad()
def _restore(params: list[torch.nn.Parameter], state: list[torch.Tensor]) -> None:
    for p, value in zip(params, state):
        p.copy_(value)
