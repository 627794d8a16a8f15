"""Counted, not timed: the torch ops and module calls a `generate` dispatches, at the prefill and per decode step.

On a GPU a small model's `generate` is bound by the host (Python and one kernel launch per op), so the ops and
module calls the gate adds are its cost there; unlike wall times, the counts are the same on every run and
machine. `aten_ops` counts the operators that reach the backend (after autograd and composite decompositions, so
close to kernel launches; views included); `module_calls` counts `nn.Module` calls.

Example:
    >>> import torch
    >>> with CallCounter() as counter:
    ...     _ = torch.nn.Linear(4, 2)(torch.ones(1, 4)).relu()
    >>> counter.module_calls, counter.aten_ops >= 2
    (1, True)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.nn.modules.module import register_module_forward_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode


class CallCounter(TorchDispatchMode):
    """Context manager counting aten operators dispatched and `nn.Module` calls made inside it (this thread)."""

    def __init__(self) -> None:
        super().__init__()
        self.aten_ops = 0
        self.module_calls = 0
        self._hook: Any = None

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        self.aten_ops += 1
        return func(*args, **(kwargs or {}))

    def _count_module(self, module: torch.nn.Module, args: Any) -> None:
        self.module_calls += 1

    def __enter__(self) -> CallCounter:
        self._hook = register_module_forward_pre_hook(self._count_module)
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        self._hook.remove()


def generate_call_counts(
    generate: Callable[..., Any], inputs: dict[str, Any], steps: int = 8
) -> dict[str, dict[str, float]]:
    """Ops and module calls of `generate(**inputs)`: `per_call` (prefill and everything once per call, measured with
    one new token) and `per_step` (each further decode step: the difference to `1 + steps` tokens, divided)."""
    counts = []
    for new in (1, 1 + steps):
        with torch.no_grad(), CallCounter() as counter:
            generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        counts.append(counter)
    once, longer = counts
    return {
        name: {"per_call": getattr(once, name), "per_step": (getattr(longer, name) - getattr(once, name)) / steps}
        for name in ("aten_ops", "module_calls")
    }
