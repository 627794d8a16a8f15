"""Trainable-state I/O: what training may change (LoRA, gate, the two token rows), saved without base weights.

Checkpoints written by `CASATrainer` and `save_trainable_state` hold this state in
`safegate_trainable.safetensors`; `load_trainable_state` restores it exactly (see docs/training.md, "Checkpoints
and resuming").

Example:
    >>> import safegate, tempfile, torch
    >>> from safegate.backbones.tiny import tiny_model_and_tokenizer
    >>> config = safegate.GateConfig(attention_dim=16, lora_r=4)
    >>> gated = safegate.attach(*tiny_model_and_tokenizer("qwen2"), config)
    >>> other = safegate.attach(*tiny_model_and_tokenizer("qwen2"), config)
    >>> _ = torch.nn.init.normal_(gated.gate.out.weight.data)
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = save_trainable_state(gated, folder)
    ...     load_trainable_state(other, folder)
    >>> path.endswith(TRAINABLE_STATE_NAME)
    True
    >>> torch.equal(other.gate.out.weight, gated.gate.out.weight)
    True
"""

from __future__ import annotations

import os
from typing import Any

import torch
from safetensors.torch import load_file, save_file

__all__ = [
    "TRAINABLE_STATE_NAME",
    "TRAINING_ARGS_NAME",
    "TRAINING_INFO_NAME",
    "load_trainable_state",
    "save_trainable_state",
    "trainable_state_dict",
    "trainable_state_names",
    "write_trainable_state",
]

TRAINABLE_STATE_NAME = "safegate_trainable.safetensors"
TRAINING_INFO_NAME = "safegate_training.json"
TRAINING_ARGS_NAME = "training_args.bin"


def trainable_state_names(gated: Any) -> list[str]:
    """Names (relative to the `SafeGateModel`) of everything training may change: LoRA, gate, token rows."""
    names = [
        n
        for n, p in gated.named_parameters()
        if p.requires_grad or "lora_" in n or "trainable_tokens_delta" in n or n.startswith("gate.")
    ]
    names += [f"gate.{n}" for n, _ in gated.gate.named_buffers()]
    return list(dict.fromkeys(names))


def trainable_state_dict(gated: Any, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """CPU copies of the trainable state (see `trainable_state_names`)."""
    wanted = set(names or trainable_state_names(gated))
    found = dict(gated.named_parameters())
    found.update({f"gate.{n}": b for n, b in gated.gate.named_buffers()})
    return {n: found[n].detach().to("cpu").clone().contiguous() for n in found if n in wanted}


def write_trainable_state(tensors: dict[str, torch.Tensor], folder: str | os.PathLike) -> str:
    """Write already-gathered trainable tensors to `folder/safegate_trainable.safetensors`; return the path."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, TRAINABLE_STATE_NAME)
    save_file(tensors, path, metadata={"format": "pt", "content": "safegate-trainable"})
    return path


def save_trainable_state(gated: Any, folder: str | os.PathLike, names: list[str] | None = None) -> str:
    """Write the trainable state to `folder/safegate_trainable.safetensors` (no base weights); return the path."""
    return write_trainable_state(trainable_state_dict(gated, names), folder)


@torch.no_grad()
def load_trainable_state(gated: Any, path: str | os.PathLike) -> None:
    """Restore the trainable state saved by `save_trainable_state` (a file or the folder holding it), exactly.

    Raises:
        `FileNotFoundError`: If there is no state file.
        `ValueError`: If names or shapes differ from this model's (naming the first mismatches).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, TRAINABLE_STATE_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no safegate trainable state at {path!r} (expected {TRAINABLE_STATE_NAME}).")
    state = load_file(path)
    own = dict(gated.named_parameters())
    own.update({f"gate.{n}": b for n, b in gated.gate.named_buffers()})
    expected = set(trainable_state_names(gated))
    for name in ("gate.input_mean", "gate.input_inv_std"):  # checkpoints from before the gate's standardisation
        if name in expected and name not in state:
            state[name] = torch.zeros_like(own[name]) if name.endswith("mean") else torch.ones_like(own[name])
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"{path}: the saved trainable state does not match this model: missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}. Attach the gate with the same GateConfig (LoRA rank/targets) before loading."
        )
    for name, value in state.items():
        target = own[name]
        if target.shape != value.shape:
            raise ValueError(
                f"{path}: {name} has shape {tuple(value.shape)} in the checkpoint but {tuple(target.shape)} here."
            )
        target.copy_(value.to(device=target.device, dtype=target.dtype))
