"""Streamer wrapper that never shows the safety token.

Example:
    >>> import torch
    >>> class Echo:
    ...     def put(self, v): print(v.tolist())
    ...     def end(self): print("end")
    >>> s = SkipSafetyTokenStreamer(Echo())
    >>> for v in ([[1, 2]], [9], [5]): s.put(torch.tensor(v))
    [[1, 2]]
    [5]
    >>> s.end()
    end
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.generation.streamers import BaseStreamer


class SkipSafetyTokenStreamer(BaseStreamer):
    """Forward `put`/`end` to `inner`, dropping the safety token.

    `generate` first puts the prompt, then one tensor per step. Without `prompt`, the second put is the safety
    token and is dropped. With `prompt` (the caller's ids), the first put — a prompt that holds the safety token
    inside — is replaced by `prompt`. `restart()` announces another `generate` call for the same answer (after a
    speculated safety token was replaced): the prompt that call puts first is dropped, the caller has seen it.
    """

    def __init__(self, inner: Any, prompt: torch.Tensor | None = None) -> None:
        self.inner = inner
        self.prompt = prompt
        self.calls = 0
        self._drop_next = False

    def restart(self) -> None:
        self._drop_next = True

    def put(self, value: torch.Tensor) -> None:
        if self._drop_next:
            self._drop_next = False
            return
        self.calls += 1
        if self.calls == 1 and self.prompt is not None:
            value = self.prompt.cpu()
        elif self.calls == 2 and self.prompt is None:
            return
        self.inner.put(value)

    def end(self) -> None:
        self.inner.end()
