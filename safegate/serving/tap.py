"""A gate that taps an inner decoder layer (`GateConfig.layer = k >= 0`) on vLLM's pooling engine.

The pooling pass returns what the model's forward returns: the final norm's output. For a gate on decoder layer `k`,
`TapExtension` (a vLLM worker extension: `worker_extension_cls="safegate.serving.tap.TapExtension"`) adds two
forward hooks to the loaded model through `collective_rpc("install_safegate_tap", k)`: one keeps layer `k`'s output
(vLLM's layers return `(hidden, residual)`; the residual stream transformers returns is their sum), the other makes
the final norm, hence the model, return `[layer k's states | final states]` per position. The pooling engine then
hands back `(seq, 2 * hidden)`: `split_states` separates the gate's input from the final states the safety logits
need.

Only one pipeline stage (the hooks sit in one process's model); text decoders whose layers are `model.model.layers`
(Llama, Qwen2 and their relatives in vLLM).

Example:
    >>> import torch
    >>> tapped, final = split_states(torch.arange(8.0).reshape(2, 4), hidden_size=2, tapped_layer=0)
    >>> tapped.tolist(), final.tolist()
    ([[0.0, 1.0], [4.0, 5.0]], [[2.0, 3.0], [6.0, 7.0]])
"""

from __future__ import annotations

from typing import Any

import torch

EXTENSION_CLASS = "safegate.serving.tap.TapExtension"
INSTALL_METHOD = "install_safegate_tap"


def split_states(states: torch.Tensor, hidden_size: int, tapped_layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(gate input, final states)` of one prompt from the pooling pass's `(seq, hidden)` or `(seq, 2 * hidden)`."""
    if tapped_layer == -1:
        return states, states
    if states.shape[-1] != 2 * hidden_size:
        raise RuntimeError(
            f"the pooling pass returned states of width {states.shape[-1]}; a gate on layer {tapped_layer} needs "
            f"{2 * hidden_size} (the tap was not installed: build the pooling engine with "
            f"worker_extension_cls={EXTENSION_CLASS!r} and call `{INSTALL_METHOD}`)"
        )
    return states[:, :hidden_size], states[:, hidden_size:]


def residual_stream(output: Any) -> torch.Tensor:
    """A decoder layer's output as transformers returns it: vLLM's layers return `(hidden, residual)`, their sum."""
    hidden, residual = output if isinstance(output, tuple) else (output, None)
    return hidden if residual is None else hidden + residual


class TapExtension:
    """Methods vLLM adds to each worker (`worker_extension_cls`); see the module docstring."""

    def install_safegate_tap(self, layer: int) -> int:
        """Hook decoder layer `layer` of the loaded model; return the number of layers the model has."""
        model: Any = self.model_runner.model  # type: ignore[attr-defined]
        decoder = getattr(model, "model", None)
        layers = getattr(decoder, "layers", None)
        if layers is None:
            raise RuntimeError(f"{type(model).__name__} has no `model.layers`: a gate on an inner layer needs them")
        if getattr(decoder, "start_layer", 0) != 0 or getattr(decoder, "end_layer", len(layers)) != len(layers):
            raise RuntimeError("a gate on an inner layer needs the whole model in one pipeline stage")
        kept: dict[str, torch.Tensor] = {}

        def keep(module: Any, args: Any, output: Any) -> None:
            kept["states"] = residual_stream(output)

        def concatenate(module: Any, args: Any, output: Any) -> Any:
            if "states" not in kept:
                raise RuntimeError("the safegate tap saw no layer output in this forward")
            normed, rest = (output[0], output[1:]) if isinstance(output, tuple) else (output, None)
            joined = torch.cat([kept.pop("states").to(normed.dtype), normed], dim=-1)
            return joined if rest is None else (joined, *rest)

        norm = getattr(decoder, "norm", None)
        if norm is None:
            raise RuntimeError(f"{type(decoder).__name__} has no final `norm`: a gate on an inner layer needs it")
        layers[layer].register_forward_hook(keep)
        norm.register_forward_hook(concatenate)  # the decoder's own forward may bypass module hooks (compile wrapper)
        return len(layers)
