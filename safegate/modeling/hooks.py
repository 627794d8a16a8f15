"""Hooks that act during one call, in one thread, and always unhook: state capture and head-input rewrites.

`HiddenStateTap` keeps a module's first output (the prefill), `HeadRowSelector` feeds the output head only the
positions a loss reads, `ContiguousHeadInput` gives the prefill's head a contiguous input.

Example:
    >>> import torch
    >>> layer = torch.nn.Linear(2, 2)
    >>> with HiddenStateTap(layer) as tap:
    ...     _ = layer(torch.ones(1, 3, 2)); _ = layer(torch.ones(1, 1, 2))
    >>> tap.states.shape, len(layer._forward_hooks)
    (torch.Size([1, 3, 2]), 0)
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch import nn


class ThreadHook:
    """A hook on `module` that acts only in the thread that entered it, and is removed on exit, also on error.

    Subclasses implement `_act`; `PRE` chooses a forward pre-hook (`_act(module, args)`, may return new args) over
    a forward hook (`_act(module, args, output)`). `_remove()` unhooks early (e.g. once the prefill is seen).
    """

    PRE = False

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self._thread = threading.get_ident()
        self._handle: Any = None

    def _call(self, module: nn.Module, *rest: Any) -> Any:
        if threading.get_ident() != self._thread:  # another thread running the same module: not ours
            return None
        return self._act(module, *rest)

    def _act(self, module: nn.Module, *rest: Any) -> Any:
        raise NotImplementedError

    def _remove(self) -> None:
        self._handle.remove()  # idempotent

    def __enter__(self) -> Any:
        self._thread = threading.get_ident()
        register = self.module.register_forward_pre_hook if self.PRE else self.module.register_forward_hook
        self._handle = register(self._call)
        return self

    def __exit__(self, *exc: object) -> None:
        self._remove()


class HiddenStateTap(ThreadHook):
    """Forward hook that keeps the first output `module` produces (the prefill pass) in the calling thread.

    Other threads running the same module concurrently are ignored, so each call owns its own states.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        self.states: torch.Tensor | None = None

    def _act(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.states is None:
            self.states = output[0] if isinstance(output, (tuple, list)) else output
            self._remove()  # prefill captured: no per-token hook cost while decoding

    def __enter__(self) -> HiddenStateTap:
        self.states = None
        return super().__enter__()


class HeadRowSelector(ThreadHook):
    """Forward pre-hook that feeds the output head only the positions `(rows, cols)` of its input, in this thread.

    A language model's head turns every position's state into vocabulary logits; a loss that reads a few positions
    needs only those. With this hook the head receives `hidden[rows, cols]` as one `(1, M, d)` sequence, so the
    model returns `(1, M, vocab)` logits, computed by the model's own head call (LoRA, trainable token rows, logit
    post-processing and any distributed wrapper stay in charge) without a `(B, T, vocab)` tensor or its gradient.

    Example:
        >>> import torch
        >>> head = torch.nn.Linear(2, 3)
        >>> with HeadRowSelector(head, torch.tensor([1]), torch.tensor([0])):
        ...     head(torch.ones(2, 4, 2)).shape
        torch.Size([1, 1, 3])
    """

    PRE = True

    def __init__(self, head: nn.Module, rows: torch.Tensor, cols: torch.Tensor) -> None:
        super().__init__(head)
        self.rows, self.cols = rows, cols
        self.calls = 0

    def _act(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if not args:
            return None
        hidden = args[0]
        if hidden.dim() != 3:
            raise RuntimeError(f"the output head got a {hidden.dim()}-D input; expected (batch, positions, hidden)")
        self.calls += 1
        picked = hidden[self.rows.to(hidden.device), self.cols.to(hidden.device)]
        return (picked.unsqueeze(0), *args[1:])


class ContiguousHeadInput(ThreadHook):
    """Pre-hook that hands the output head a contiguous input on its first call in this thread (the prefill).

    `generate` projects only the last prompt position, a strided slice of the final states. With frozen head
    weights (as under PEFT) PyTorch's `matmul` does not fold such a slice into one matrix product and runs a batched
    product that reads the whole head matrix once per row: at batch 8 on a CPU the head then costs about 2x, and a
    plain model whose weights still require grad does not pay it. Decode steps feed contiguous states; the hook
    removes itself after the prefill.

    Example:
        >>> head = torch.nn.Linear(4, 6).requires_grad_(False)
        >>> with ContiguousHeadInput(head):
        ...     head(torch.ones(2, 5, 4)[:, -1:]).shape, len(head._forward_pre_hooks)
        (torch.Size([2, 1, 6]), 0)
    """

    PRE = True

    def _act(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        self._remove()
        if args and isinstance(args[0], torch.Tensor) and not args[0].is_contiguous():
            return (args[0].contiguous(), *args[1:])
        return None
