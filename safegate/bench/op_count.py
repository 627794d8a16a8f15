"""Counted, not timed: the torch ops and module calls a `generate` dispatches, at the prefill and per decode step.

On a GPU a small model's `generate` is bound by the host (Python and one kernel launch per op), so the ops and
module calls the gate adds are its cost there; unlike wall times, the counts do not change from run to run (they
can with the device, the attention backend or the torch version). `aten_ops` counts the operators that reach the
backend (after autograd and composite decompositions, so close to kernel launches; views included);
`module_calls` counts `nn.Module` calls.

Example:
    >>> import torch
    >>> with CallCounter() as counter:
    ...     _ = torch.nn.Linear(4, 2)(torch.ones(1, 4)).relu()
    >>> counter.module_calls, counter.aten_ops >= 2
    (1, True)
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch
from torch.nn.modules.module import register_module_forward_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.hooks import RemovableHandle


class CallCounter(TorchDispatchMode):
    """Context manager counting the aten operators dispatched and the `nn.Module` calls made inside it, in the
    thread that entered it. Module calls are seen through a process-wide hook: use one counter at a time."""

    def __init__(self) -> None:
        super().__init__()
        self.aten_ops = 0
        self.module_calls = 0
        self._thread = threading.get_ident()
        self._hook: RemovableHandle | None = None

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        self.aten_ops += 1
        return func(*args, **(kwargs or {}))

    def _count_module(self, module: torch.nn.Module, args: Any) -> None:
        if threading.get_ident() == self._thread:
            self.module_calls += 1

    def __enter__(self) -> CallCounter:
        if self._hook is not None:
            raise RuntimeError("this CallCounter is already counting; use a new one")
        self._thread = threading.get_ident()
        self._hook = register_module_forward_pre_hook(self._count_module)
        try:
            return super().__enter__()
        except BaseException:
            self._hook.remove()
            self._hook = None
            raise

    def __exit__(self, *exc: Any) -> None:
        try:
            super().__exit__(*exc)
        finally:
            if self._hook is not None:
                self._hook.remove()
                self._hook = None


def generate_call_counts(
    generate: Callable[..., Any], inputs: dict[str, Any], steps: int = 8
) -> dict[str, dict[str, float]]:
    """Ops and module calls of `generate(**inputs)`: `per_call` (the prefill and everything done once per call,
    counted with one new token) and `per_step` (each further decode step: the difference to `1 + steps` new
    tokens, divided). One uncounted warm-up call first, so one-time work (lazy init, caches) is not counted."""
    counts = []
    for new in (None, 1, 1 + steps):
        with torch.no_grad(), CallCounter() as counter:
            generate(**inputs, max_new_tokens=new or 1, min_new_tokens=new or 1, do_sample=False)
        if new is not None:
            counts.append(counter)
    once, longer = counts
    return {
        name: {"per_call": getattr(once, name), "per_step": (getattr(longer, name) - getattr(once, name)) / steps}
        for name in ("aten_ops", "module_calls")
    }
