"""`safegate.training` keeps resolving every public name it had as a module, from the module that now owns it."""

import importlib

import pytest

import safegate
import safegate.training
from safegate.evaluation import metrics
from safegate.testing import tiny_model_and_tokenizer
from tests.conftest import SMALL

OLD_PUBLIC_NAMES = [
    "CASATrainer", "PromptCache", "TRAINABLE_STATE_NAME", "auroc", "cache_prompts", "demo_gate_training",
    "encode_records", "fit_gate", "load_trainable_state", "prompt_scores", "save_trainable_state", "train",
    "trainable_state_dict", "trainable_state_names", "training_arguments",
]  # fmt: skip


@pytest.mark.parametrize("name", OLD_PUBLIC_NAMES)
def test_old_public_name_resolves_to_its_home(name):
    value = getattr(safegate.training, name)
    assert value is getattr(importlib.import_module(safegate.training.HOMES[name]), name)


def test_auroc_is_the_one_in_evaluation_metrics():
    assert safegate.training.auroc is metrics.auroc
    assert safegate.training.auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75


def test_fit_gate_reports_no_auroc_for_one_class(one_thread):
    gated = safegate.attach(*tiny_model_and_tokenizer("qwen2"), safegate.GateConfig(**SMALL))
    safe_only = [{"prompt": "How do I bake bread?", "label": "safe"}] * 2
    stats = safegate.fit_gate(gated, safe_only, epochs=1, eval_data=safe_only)
    assert "train_auroc" not in stats and "eval_auroc" not in stats and stats["train_accuracy"] >= 0
