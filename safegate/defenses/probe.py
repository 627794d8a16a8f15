"""SafeSteer's probe and alignment vector, and the one safetensors file that holds both (no pickle).

`LinearProbe` scores hidden states, `AlignmentVector` (MSAV) shifts them for image inputs; `save_steering` /
`load_steering` keep both in one file. Fitting them: `safegate.defenses.probe_fit`; using them while decoding:
`safegate.defenses.SafeSteer`.

Example:
    >>> import torch
    >>> probe = LinearProbe(torch.ones(4), 0.0, torch.zeros(4), torch.ones(4), layer=2, tau=0.9)
    >>> round(float(probe(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))[0]), 4), probe.layer
    (0.7311, 2)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


class LinearProbe(nn.Module):
    """Logistic probe `s(h) = sigmoid(w . (h - mean) / std + b)` over hidden states of one layer (P1).

    Attributes:
        layer (`int`): the decoder layer it reads (`-1` = the final norm), as in `ResolvedArch.tap_module`.
        tau (`float`): decision threshold (set at a 5% false-positive rate by `fit_probe`).
        metrics (`dict`): fitting report (validation AUROC per layer, positions used, ...).
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | float,
        mean: torch.Tensor,
        std: torch.Tensor,
        layer: int,
        tau: float = 0.5,
        metrics: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.register_buffer("weight", torch.as_tensor(weight, dtype=torch.float32).flatten())
        self.register_buffer("bias", torch.as_tensor(bias, dtype=torch.float32).reshape(()))
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).flatten())
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).flatten())
        self.layer = int(layer)
        self.tau = float(tau)
        self.metrics = dict(metrics or {})

    def logit(self, hidden: torch.Tensor) -> torch.Tensor:
        h = hidden.float().to(self.weight.device)
        return ((h - self.mean) / self.std) @ self.weight + self.bias

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """p(harmful) for hidden states `(..., d)`."""
        return torch.sigmoid(self.logit(hidden))

    def save(self, path: str | os.PathLike, alignment: AlignmentVector | None = None) -> None:
        """Write the probe (and an optional MSAV) to one safetensors file."""
        save_steering(path, self, alignment)

    @classmethod
    def load(cls, path: str | os.PathLike) -> LinearProbe:
        return load_steering(path)[0]


@dataclass
class AlignmentVector:
    """Modal semantic alignment vector (MSAV, P4): `gamma * scale * v_hat` is added at `layer` after the prefill.

    Attributes:
        vector (`torch.Tensor`): unit direction `mean h(text form) - mean h(image form)` at `layer`.
        layer (`int`): decoder layer whose output receives it (`-1` = the final norm).
        gamma (`float`): strength (OUR CHOICE: 4.0, to be tuned on validation data).
        scale (`float`): mean hidden-state norm at `layer` (makes `gamma` model-independent).
    """

    vector: torch.Tensor
    layer: int
    gamma: float = 4.0
    scale: float = 1.0
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def delta(self) -> torch.Tensor:
        return self.vector.float() * (self.gamma * self.scale)


def save_steering(path: str | os.PathLike, probe: LinearProbe, alignment: AlignmentVector | None = None) -> None:
    """Save a probe and an optional alignment vector to a safetensors file (no pickle)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in probe.state_dict().items()}
    meta: dict[str, Any] = {"layer": probe.layer, "tau": probe.tau, "metrics": probe.metrics, "format": "safesteer/1"}
    if alignment is not None:
        tensors["align.vector"] = alignment.vector.detach().float().cpu().contiguous()
        meta["alignment"] = {"layer": alignment.layer, "gamma": alignment.gamma, "scale": alignment.scale}
    save_file(tensors, str(path), metadata={"safegate": json.dumps(meta)})


def load_steering(path: str | os.PathLike) -> tuple[LinearProbe, AlignmentVector | None]:
    """Load what `save_steering` wrote; `ValueError` if the file is not a SafeSteer file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get("safegate")
        if raw is None:
            raise ValueError(f"{path}: not a SafeSteer file (no `safegate` metadata); write it with save_steering().")
        meta = json.loads(raw)
        t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    probe = LinearProbe(t["weight"], t["bias"], t["mean"], t["std"], meta["layer"], meta["tau"], meta["metrics"])
    alignment = None
    if "alignment" in meta:
        a = meta["alignment"]
        alignment = AlignmentVector(t["align.vector"], a["layer"], a["gamma"], a["scale"])
    return probe, alignment
