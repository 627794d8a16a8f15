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

from safegate._lazy import lazy_attributes
from safegate._moved import install as _install_moved_finder
from safegate.hub import bundle as _bundle  # noqa: F401 - registers the format `SafeGateModel.save_bundle` writes
from safegate.hub import merged as _merged  # noqa: F401 - registers the writer `SafeGateModel.save_merged` calls
from safegate.modeling.config import GateConfig
from safegate.modeling.gate import SafetyGate
from safegate.modeling.model import SafeGateModel, attach
from safegate.modeling.pipeline import SafeGateTextGenerationPipeline
from safegate.modeling.pipeline import register as _register_pipeline

SafeGateConfig = GateConfig
__version__ = "0.1.0"

# Heavier entry points load on first use: `safegate.train`, `safegate.load_bundle`, ...
_LAZY = {
    "load_bundle": "safegate.hub.bundle",
    "SafeGateBundle": "safegate.hub.bundle",
    "load_merged": "safegate.hub.merged",
    "train": "safegate.training.trainer",
    "fit_gate": "safegate.training.gate_fit",
    "calibrate_threshold": "safegate.training.calibrate",
    "fit_balanced_threshold": "safegate.training.calibrate",
    "load_model": "safegate.backbones.load",
    "format_prompt": "safegate.data.records",
    "pipeline": "safegate.modeling.pipeline",
}

__all__ = [
    "GateConfig",
    "SafeGateConfig",
    "SafeGateModel",
    "SafeGateTextGenerationPipeline",
    "SafetyGate",
    "attach",
    "__version__",
    *_LAZY,
]
__getattr__ = lazy_attributes(__name__, _LAZY)
_install_moved_finder()
_register_pipeline()  # `pipeline("text-generation", model=gated)` supports the gated model and reports its verdict
