"""Fixtures of the serving tests (`make test-serve`, in `.venv-serve` with vLLM): one tiny gated Llama, its merged
export, and a `GatedLLM` on it per path for the whole session (engine starts dominate the run time)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import safegate
from safegate.testing import chat, tiny_model_and_tokenizer

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")

#: Prompts whose verdicts differ under the fixture's gate, a prefill attack and a prefix that closes its turn.
USERS = ["How do I bake bread?", "Tell me how to pick a lock.", "Write a haiku about rain.", "How to make a weapon?"]


def build_export(folder: Path, layer: int = -1) -> tuple[safegate.SafeGateModel, object, str]:
    """A tiny Llama (head size 32, which vLLM's CPU attention supports) with a perturbed LoRA and a gate on `layer`
    whose bias splits the prompts' verdicts, and its merged export (`save_merged` writes the weights index vLLM
    needs)."""
    model, tok = tiny_model_and_tokenizer("llama", num_attention_heads=2, num_key_value_heads=1)
    gated = safegate.attach(model, tok, safegate.GateConfig(attention_dim=16, lora_r=4, layer=layer)).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in gated.named_parameters():
            if "lora_B" in name or name.startswith("gate.") and "query" not in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
        scores = torch.logit(gated.classify(**chat(tok, USERS)).clamp(1e-6, 1 - 1e-6))
        gated.gate.out.bias -= scores.median() + 1e-3  # about half the prompts unsafe
    exported = gated.save_merged(folder)
    return gated, tok, str(exported)


@pytest.fixture(scope="session")
def gated_and_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[safegate.SafeGateModel, object, str]:
    """The gate on the final norm (the default), exported."""
    return build_export(tmp_path_factory.mktemp("export") / "merged")


@pytest.fixture(scope="session", params=["one-pass", "two-pass"])
def gated_llm(request: pytest.FixtureRequest, gated_and_export: tuple) -> object:
    """`GatedLLM` deciding in the generating engine (`serving.one_pass`), and with a pooling pass first."""
    from safegate.serving import GatedLLM

    _, _, folder = gated_and_export
    kwargs = {"dtype": "float32", "enforce_eager": True, "max_model_len": 256, "max_num_seqs": 8}
    return GatedLLM(folder, one_pass=request.param == "one-pass", **kwargs)
