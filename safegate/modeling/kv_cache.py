"""The KV-cache keyword of the installed transformers: `cache` from 5.24 on, `past_key_values` before.

transformers 5.24 renamed the forward/generate keyword `past_key_values` to `cache` (the old name still works
with a deprecation warning until 5.40, but `generate` now hands the model `cache=`). Code that reads or passes a
cache goes through these helpers, so it works on both sides of the rename and never triggers the warning.

Example:
    >>> CACHE_KWARG in ("cache", "past_key_values")
    True
    >>> cache_in({"past_key_values": 1}), cache_in({"cache": 2}), cache_in({})
    (1, 2, None)
"""

from __future__ import annotations

import inspect
from typing import Any

from transformers import GenerationMixin

#: Every name a cache may travel under, newest first.
CACHE_KWARGS = ("cache", "past_key_values")
#: The name the installed transformers' forward and generate expect (read from the generation mixin every model
#: shares, so no model class is imported for it).
CACHE_KWARG = (
    "cache" if "cache" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    else "past_key_values"
)  # fmt: skip


def cache_in(kwargs: dict[str, Any]) -> Any:
    """The cache inside forward/generate keyword arguments under either name, or `None`."""
    for name in CACHE_KWARGS:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def without_cache(kwargs: dict[str, Any]) -> dict[str, Any]:
    """`kwargs` without a cache under either name."""
    return {k: v for k, v in kwargs.items() if k not in CACHE_KWARGS}


def output_cache(output: Any) -> Any:
    """The cache a model output returned (`output.cache` or, before 5.24, `output.past_key_values`)."""
    keys = output.keys() if hasattr(output, "keys") else ()
    for name in CACHE_KWARGS:
        if name in keys:
            return output[name]
    return None
