"""Training: `train` on transformers' `Trainer`, the CASA objective, batching, the gate-only fit, recipes, CLI.

Modules: `trainer` (`train`, `CASATrainer`), `state` (trainable-state I/O), `examples` (records encoded for the
collator, `prompt_scores`), `objective` (the CASA loss), `collate`, `gate_fit` (`fit_gate`), `gate_opt` (its
optimiser loop), `calibrate` (`calibrate_threshold`, `fit_balanced_threshold`), `recipes`, `cli`, `demo` (a
seconds-long gate fit on the shipped data).

`safegate.training` was a module before the 0.2 layout; its public names still resolve here, lazily.
"""

from safegate._lazy import lazy_attributes

HOMES = {
    "CASATrainer": "safegate.training.trainer",
    "train": "safegate.training.trainer",
    "training_arguments": "safegate.training.trainer",
    "TRAINABLE_STATE_NAME": "safegate.training.state",
    "load_trainable_state": "safegate.training.state",
    "save_trainable_state": "safegate.training.state",
    "trainable_state_dict": "safegate.training.state",
    "trainable_state_names": "safegate.training.state",
    "encode_records": "safegate.training.examples",
    "prompt_scores": "safegate.training.examples",
    "PromptCache": "safegate.training.prompt_cache",
    "cache_prompts": "safegate.training.prompt_cache",
    "fit_gate": "safegate.training.gate_fit",
    "GateFitError": "safegate.training.gate_opt",
    "calibrate_threshold": "safegate.training.calibrate",
    "fit_balanced_threshold": "safegate.training.calibrate",
    "demo_gate_training": "safegate.training.demo",
    "auroc": "safegate.evaluation.metrics",  # the one AUROC; re-exported for the old `safegate.training.auroc`
}
"""Public name -> the module that defines it."""

__getattr__ = lazy_attributes(__name__, HOMES)
