"""Old module paths (before the 0.2 layout) keep importing, with a `DeprecationWarning`, for one release.

`import safegate.bundle` returns the module now at `safegate.hub.bundle`, so code written against the flat layout
keeps working while it moves. New code imports from the subpackages (see `docs/architecture.md`).

Example:
    >>> import warnings
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore", DeprecationWarning)
    ...     import safegate.bundle as old
    >>> old.__name__
    'safegate.hub.bundle'
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType

MOVED = {
    "config": "modeling.config",
    "arch": "modeling.arch",
    "gate": "modeling.gate",
    "tokens": "modeling.tokens",
    "hooks": "modeling.hooks",
    "kv_cache": "modeling.kv_cache",
    "fast_tokens": "modeling.peft_tokens",
    "processor": "modeling.logits_process",
    "streaming": "modeling.streamers",
    "prefill": "modeling.prefix",
    "speculative": "modeling.speculative",
    "model": "modeling.model",
    "bundle": "hub.bundle",
    "bundle_files": "hub.files",
    "bundle_cli": "hub.cli",
    "training_data": "data.build",
    "objective": "training.objective",
    "collate": "training.collate",
    "gate_fit": "training.gate_fit",
    "recipes": "training.recipes",
    "train_cli": "training.cli",
    "datasets": "data.sources",
    "refusal_classifier": "data.refusal_classifier",
    "multimodal": "data.multimodal",
    "loading": "backbones.load",
    "builtin": "backbones.builtin",
    "op_count": "bench.op_count",
    "testing_multimodal": "testing.multimodal",
}
"""Old module name under `safegate.` -> its home now. (`safegate.data`, `safegate.training` and `safegate.bench`
are packages now and re-export their old public names themselves.)"""


class _MovedModuleLoader(importlib.abc.Loader):
    def __init__(self, new_name: str) -> None:
        self.new_name = new_name

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        warnings.warn(
            f"`{spec.name}` moved to `{self.new_name}`; the old path goes away in the next release",
            DeprecationWarning,
            stacklevel=3,
        )
        return importlib.import_module(self.new_name)

    def exec_module(self, module: ModuleType) -> None:  # the module is the already-executed new one
        return None


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Finds `safegate.<old name>` and hands back the module at its new home."""

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        prefix, _, name = fullname.partition(".")
        if prefix != "safegate" or name not in MOVED:
            return None
        new_name = f"safegate.{MOVED[name]}"
        return importlib.machinery.ModuleSpec(fullname, _MovedModuleLoader(new_name))


def install() -> None:
    """Put the finder on `sys.meta_path` once."""
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())
