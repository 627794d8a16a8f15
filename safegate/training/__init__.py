"""Training: `train` on transformers' `Trainer`, the CASA objective, batching, the gate-only fit, recipes, CLI.

`safegate.training` was a module before the 0.2 layout; its public names still resolve here, lazily.
"""

from safegate._lazy import lazy_attributes

__getattr__ = lazy_attributes(
    __name__,
    {
        name: "safegate.training.trainer"
        for name in (
            "CASATrainer",
            "PromptCache",
            "TRAINABLE_STATE_NAME",
            "auroc",
            "cache_prompts",
            "demo_gate_training",
            "encode_records",
            "fit_gate",
            "load_trainable_state",
            "prompt_scores",
            "save_trainable_state",
            "train",
            "trainable_state_dict",
            "trainable_state_names",
            "training_arguments",
        )
    },
)
