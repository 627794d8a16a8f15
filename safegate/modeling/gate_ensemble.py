"""Several safety gates read the same prompt states; the verdict reads the mean of their logits.

`GateConfig(members=K)` builds `GateEnsemble`: K `SafetyGate`s, each with its own randomly initialised query and
value projections, trained side by side on the same batches, each on its own loss (`member_pair_loss`: the mean
over members of each member's pair cross-entropy), so they stay K separate fits rather than one wider gate whose
parts compensate each other. At inference the gate logit is the mean of the K member logits. Why: single gate fits
disagree on the rare benign look-alikes they flag ("How can I poison vermin in my garden?"), and the mean of
independent fits orders prompts better than any one of them (docs/generalization.md, "An ensemble of gates").

`members=1` (the default) is exactly the single `SafetyGate` of the paper: same module, same state names, same
loss, so every bundle saved before this option existed loads and scores as before.

Example:
    >>> import torch
    >>> from safegate.modeling.config import GateConfig
    >>> gate = build_gate(8, torch.zeros(8), GateConfig(attention_dim=4, members=3))
    >>> gate.member_logits(torch.randn(2, 5, 8), torch.ones(2, 5)).shape
    torch.Size([2, 3])
    >>> type(build_gate(8, torch.zeros(8), GateConfig(attention_dim=4))).__name__
    'SafetyGate'
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from safegate.modeling.config import GateConfig
from safegate.modeling.gate import SafetyGate, gate_pair_logits


class GateEnsemble(nn.Module):
    """`members` independently initialised `SafetyGate`s over the same states; `forward` is their mean logit."""

    def __init__(self, members: Iterable[SafetyGate]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        if len(self.members) < 2:
            raise ValueError(f"GateEnsemble needs >= 2 members, got {len(self.members)}; use the SafetyGate itself.")

    @property
    def aggregation(self) -> str:
        return self.members[0].aggregation

    def set_input_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Standardise every member's input with the same `mean` / `std` (see `SafetyGate.set_input_stats`)."""
        for member in self.members:
            member.set_input_stats(mean, std)

    def has_input_stats(self) -> bool:
        return all(member.has_input_stats() for member in self.members)

    def is_fresh(self) -> bool:
        """Whether no member has been trained yet (every read-out still zero: the gate is a constant)."""
        return all(member.is_fresh() for member in self.members)

    @torch.no_grad()
    def set_output_bias(self, value: float) -> None:
        """Set every member's read-out bias to `value` (the mean logit is then `value` for a fresh gate)."""
        for member in self.members:
            member.set_output_bias(value)

    def member_logits(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Each member's gate logit, `(B, members)`."""
        return torch.stack([member(hidden, mask) for member in self.members], dim=-1)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The gate logit `x` (B,): the mean of the members' logits."""
        return self.member_logits(hidden, mask).mean(-1)


def build_gate(hidden_size: int, query: torch.Tensor, config: GateConfig) -> SafetyGate | GateEnsemble:
    """The gate `config` describes: one `SafetyGate` (`members=1`) or a `GateEnsemble` of `config.members`."""
    args = (hidden_size, query, config.attention_dim, config.aggregation, config.train_query)
    return SafetyGate(*args) if config.members == 1 else GateEnsemble(SafetyGate(*args) for _ in range(config.members))


def query_name(config: GateConfig) -> str:
    """Name of the (first) descriptor query in the state of the gate `config` builds (every member's is the same)."""
    return "query" if config.members == 1 else "members.0.query"


def member_pair_loss(
    z_safe: torch.Tensor, z_unsafe: torch.Tensor, member_logits: torch.Tensor, labels: torch.Tensor, scaling: str
) -> torch.Tensor:
    """Per-sample gate loss `(B,)`: the mean over members of the cross-entropy of each member's gated pair.

    `z_safe`, `z_unsafe`, `labels` are `(B,)`; `member_logits` is `(B, K)` (K = 1 for a single gate, where this is
    exactly the cross-entropy of the one gated pair).
    """
    pair_safe, pair_unsafe = gate_pair_logits(z_safe.unsqueeze(-1), z_unsafe.unsqueeze(-1), member_logits, scaling)
    pair = torch.stack([pair_safe, pair_unsafe], dim=-1).float()  # (B, K, 2)
    targets = labels.long().unsqueeze(-1).expand(pair.shape[:2])
    return F.cross_entropy(pair.flatten(0, 1), targets.flatten(), reduction="none").view(pair.shape[:2]).mean(-1)
