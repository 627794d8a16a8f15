"""The CASA training objective on one right-padded batch (see `safegate.training.collate`).

    L = beta * L_unsafe + (1 - beta) * L_safe

Each class term is the mean over that class's samples of

    CE2(gated pair at the safety step; target token) + token-mean CE of the response [+ aux * BCE(v_s, y)]

Only the rows the loss reads reach the output head (`HeadRowSelector`): the safety step of each row and the
positions that predict a response token, so no `(batch, length, vocab)` logits are ever built. The gated pair is
computed exactly as at inference: gate input states are captured with `gated.tap()` in the same
forward, the gate reads the prompt positions only, and `gated.gated_pair` scales the (safe, unsafe) logits at the
last prompt position. A class missing from a batch contributes nothing (its term is zero), so `beta` keeps its
meaning when batches hold one sample (e.g. per-device batch 1 with gradient accumulation).

Methods: `casa` (gate + safety token), `token_only` (safety token, gate logit fixed at 0, i.e. v_s = 0.5),
`ssft` (no safety token: response cross-entropy only).

Example:
    >>> import torch
    >>> class_weighted_mean(torch.tensor([1.0, 3.0, 5.0]), torch.tensor([1, 0, 0]), beta=0.5)
    tensor(2.5000)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from safegate.modeling.gate import gate_pair_logits, unsafe_probability
from safegate.modeling.gate_ensemble import member_pair_loss
from safegate.modeling.hooks import HeadRowSelector
from safegate.modeling.speculative import final_states_tap, pair_weight
from safegate.training.collate import BATCH_KEYS, check_method


@dataclass
class CASALossOutput:
    """Loss and per-batch diagnostics of one CASA step (all diagnostics detached)."""

    loss: torch.Tensor
    gate_loss: torch.Tensor | None
    response_loss: torch.Tensor
    gate_accuracy: torch.Tensor | None
    p_unsafe: torch.Tensor | None
    aux_loss: torch.Tensor | None = None


def class_weighted_mean(values: torch.Tensor, labels: torch.Tensor, beta: float) -> torch.Tensor:
    """`beta * mean(values[unsafe]) + (1 - beta) * mean(values[safe])`; a missing class contributes 0."""
    unsafe = labels.to(values.dtype)
    safe = 1.0 - unsafe
    # no data-dependent branches: a missing class has zero weight, and nothing waits on the device
    mean_unsafe = (values * unsafe).sum() / unsafe.sum().clamp(min=1.0)
    mean_safe = (values * safe).sum() / safe.sum().clamp(min=1.0)
    return beta * mean_unsafe + (1.0 - beta) * mean_safe


def casa_loss(
    gated: Any,
    batch: dict[str, Any],
    *,
    beta: float = 0.5,
    method: str = "casa",
    aux_weight: float = 0.0,
    forward: Any = None,
) -> CASALossOutput:
    """CASA loss of one collated batch.

    Args:
        gated (`SafeGateModel`): The gated model (unwrapped: its `tap`, `gate_logit` and `gated_pair` are used).
        batch (`dict`): Output of `CASACollator` (on the model's device).
        beta (`float`): Weight of the unsafe-class term.
        method (`str`): `"casa"`, `"token_only"` or `"ssft"`.
        aux_weight (`float`): Weight of the auxiliary BCE on v_s (method `casa` only).
        forward (`Callable | None`): What runs the model (e.g. a DDP-wrapped `gated`); default `gated`.
    """
    check_method(method)
    forward = forward if forward is not None else gated
    model_inputs = {k: v for k, v in batch.items() if k not in BATCH_KEYS or k in ("input_ids", "attention_mask")}
    input_ids = batch["input_ids"]
    device = input_ids.device
    batch_size = input_ids.shape[0]
    classes = batch["class_labels"].to(device)
    labels = batch["labels"].to(device)
    # the head projects only the positions the loss reads: every position whose next token is a response target
    # (one host sync, for the count), and the safety step of each row unless its two logits come from the final
    # states times the head's two safety rows (a (2, d) product); no (B, T, vocab) logits exist
    owner, position = (labels[:, 1:] != -100).nonzero(as_tuple=True)
    targets = labels[owner, position + 1]
    gated_step = method != "ssft"
    head = gated.arch.root.get_output_embeddings()
    pair_ids = [gated.safe_token_id, gated.unsafe_token_id]
    pair_rows = pair_weight(gated) if gated_step else None
    n_steps = batch_size if gated_step and pair_rows is None else 0
    step_index = batch["safety_index"].to(device)
    rows = torch.cat([torch.arange(n_steps, device=device), owner])
    cols = torch.cat([step_index[:n_steps], position])
    with contextlib.ExitStack() as stack:
        tap = stack.enter_context(gated.tap())
        final = final_states_tap(gated, tap, stack) if pair_rows is not None else None
        selector = stack.enter_context(HeadRowSelector(head, rows, cols))
        outputs = forward(**model_inputs, use_cache=False)
    if selector.calls != 1:
        raise RuntimeError(f"the output head ran {selector.calls} times in one forward; expected exactly once")
    logits = outputs.logits if hasattr(outputs, "logits") else outputs[0]
    logits = logits.view(-1, logits.shape[-1]).float()  # (rows, vocab); views only: no full-size copy in backward
    # cross-entropy over every row (any safety steps ignored), sliced afterwards: slicing the (rows, vocab) logits
    # would cost a full-size zero-filled gradient per slice in backward
    ignored = torch.full((n_steps,), -100, dtype=targets.dtype, device=device)
    token_ce = F.cross_entropy(logits, torch.cat([ignored, targets]), reduction="none")[n_steps:]

    response = _per_sample_mean(token_ce, owner, batch_size)
    per_sample = response
    gate_loss = gate_acc = p_unsafe = aux = None
    if gated_step:
        if method == "casa":
            if tap.states is None:
                raise RuntimeError("the hidden-state tap saw no forward pass; cannot compute the gate")
            # the mask is zero after each prompt, so the gate reads exactly the prompt positions (no host sync)
            # each gate member's logit (B, members): every member of an ensemble learns on its own loss
            member_logit = gated.gate_logit(tap.states, batch["prompt_mask"], members=True)
        else:
            member_logit = logits.new_zeros(batch_size, 1)
        gate_logit = member_logit.mean(-1)
        if final is not None:
            assert final.states is not None and pair_rows is not None
            steps = final.states[torch.arange(batch_size, device=device), step_index]
            picked = F.linear(steps, pair_rows.to(steps.dtype)).float()  # (steps, 2): safe, unsafe
        else:
            index = torch.tensor(pair_ids, device=device).expand(logits.shape[0], 2)
            picked = logits.gather(1, index)[:n_steps]
        scaling = gated.gate_config.scaling
        pair_ce = member_pair_loss(picked[:, 0], picked[:, 1], member_logit, classes, scaling)
        z_safe, z_unsafe = gate_pair_logits(picked[:, 0], picked[:, 1], gate_logit, scaling)  # the verdict's pair
        gate_mask = batch.get("gate_mask")
        gate_mask = torch.ones_like(pair_ce) if gate_mask is None else gate_mask.to(pair_ce.device, pair_ce.dtype)
        pair_ce = pair_ce * gate_mask  # counterfactual records (mask 0): the answer follows the token, no gate loss
        per_sample = per_sample + pair_ce
        if aux_weight and method == "casa":
            member_classes = classes.float().unsqueeze(-1).expand(member_logit.shape)
            aux = F.binary_cross_entropy_with_logits(member_logit.float(), member_classes, reduction="none").mean(-1)
            per_sample = per_sample + aux_weight * aux
            aux = aux.mean().detach()
        counted = gate_mask.sum().clamp(min=1.0)  # diagnostics over the records that teach the gate
        gate_loss = (pair_ce.sum() / counted).detach()
        gate_acc = ((((z_unsafe >= z_safe).long() == classes).float() * gate_mask).sum() / counted).detach()
        p_unsafe = unsafe_probability(z_safe, z_unsafe).detach()
    loss = class_weighted_mean(per_sample, classes, beta)
    return CASALossOutput(
        loss=loss,
        gate_loss=gate_loss,
        response_loss=response.mean().detach(),
        gate_accuracy=gate_acc,
        p_unsafe=p_unsafe,
        aux_loss=aux,
    )


def _per_sample_mean(values: torch.Tensor, owner: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Mean of `values` (N,) per sample, value `i` belonging to sample `owner[i]`; 0 for a sample with none."""
    sums = torch.zeros(batch_size, dtype=values.dtype, device=values.device).index_add(0, owner, values)
    counts = torch.zeros(batch_size, dtype=values.dtype, device=values.device).index_add(
        0, owner, torch.ones_like(values)
    )
    return sums / counts.clamp(min=1)
