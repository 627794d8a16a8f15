"""PEP 562 lazy attributes: a package names what it re-exports without importing it up front.

Example:
    >>> __getattr__ = lazy_attributes("demo", {"sqrt": "math"})
    >>> __getattr__("sqrt")(4.0)
    2.0
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_attributes(package: str, homes: Mapping[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` that imports `homes[name]` on first use and returns its `name`."""

    def __getattr__(name: str) -> Any:
        if name in homes:
            return getattr(importlib.import_module(homes[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
