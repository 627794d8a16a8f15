"""`HiddenStateTap`: capture a module's output during one call, in one thread, and always unhook.

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


class HiddenStateTap:
    """Forward hook that keeps the first output `module` produces (the prefill pass) in the calling thread.

    Other threads running the same module concurrently are ignored, so each call owns its own states.
    The hook is removed on exit, also when the body raises.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.states: torch.Tensor | None = None
        self._thread = threading.get_ident()
        self._handle: Any = None

    def _hook(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.states is None and threading.get_ident() == self._thread:
            self.states = output[0] if isinstance(output, (tuple, list)) else output
            self._handle.remove()  # prefill captured: no per-token hook cost while decoding

    def __enter__(self) -> HiddenStateTap:
        self._thread = threading.get_ident()
        self.states = None
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()  # idempotent
