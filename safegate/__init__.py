"""safegate: CASA safety gates for Hugging Face models.

The model first emits a safety token (`safe`/`unsafe`) chosen from its own hidden states by a small safety
attention gate, then writes its answer conditioned on that token (CASA, arXiv 2604.00310).

Example:
    >>> import safegate
    >>> from safegate.testing import tiny_model_and_tokenizer, chat
    >>> model, tok = tiny_model_and_tokenizer()
    >>> gated = safegate.attach(model, tok, safegate.GateConfig(attention_dim=16, lora_r=4))
    >>> out = gated.generate(**chat(tok, ["Hi!"]), max_new_tokens=3, return_dict_in_generate=True)
    >>> out.safety[0] in {"safe", "unsafe"}
    True
"""

from .config import GateConfig
from .gate import SafetyGate
from .model import SafeGateModel, attach

SafeGateConfig = GateConfig
__version__ = "0.1.0"

# Heavier entry points load on first use: `safegate.train`, `safegate.load_bundle`, ...
_LAZY = {
    "load_bundle": "safegate.bundle",
    "SafeGateBundle": "safegate.bundle",
    "train": "safegate.training",
    "fit_gate": "safegate.training",
    "load_model": "safegate.loading",
    "format_prompt": "safegate.data",
}

__all__ = ["GateConfig", "SafeGateConfig", "SafeGateModel", "SafetyGate", "attach", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'safegate' has no attribute {name!r}")
