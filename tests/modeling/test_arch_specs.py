"""Architecture specs in `adapters/`: schema, resolution of every supported backbone, packaging, clear errors."""

import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import torch

import safegate
from safegate.modeling import arch as arch_module
from safegate.modeling.arch import ArchSpec, check_required_inputs, load_specs, resolve, specs_dir, unwrap
from safegate.testing import tiny_model_and_tokenizer
from safegate.testing.multimodal import ARCHS, multimodal_batch, tiny_multimodal
from tests.conftest import SMALL

REPO = Path(__file__).resolve().parents[2]
ADAPTERS = REPO / "adapters"
TOWERS = ("visual", "audio_tower", "vision_tower", "multi_modal_projector")
EXPECTED = {
    "qwen2": ("Qwen2ForCausalLM", None),
    "llama": ("LlamaForCausalLM", None),
    "qwen2_vl": ("Qwen2VLForConditionalGeneration", None),
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", None),
    "llava": ("LlavaForConditionalGeneration", None),
    "qwen2_5_omni_thinker": ("Qwen2_5OmniThinkerForConditionalGeneration", None),
    "qwen2_5_omni": ("Qwen2_5OmniThinkerForConditionalGeneration", "thinker"),
}


def test_every_supported_model_type_has_a_valid_spec_named_after_it():
    specs = load_specs(str(ADAPTERS))
    assert set(EXPECTED) <= set(specs)
    for path in ADAPTERS.glob("*.toml"):
        spec = specs[path.stem]
        assert spec.model_type == path.stem, f"{path.name} declares model_type {spec.model_type!r}"
        if spec.lora_target:
            re.compile(spec.lora_target)
    for model_type, (model_class, unwrap_attr) in EXPECTED.items():
        assert specs[model_type].model_class == model_class
        assert specs[model_type].unwrap == unwrap_attr
    assert specs["qwen2_5_omni"].kwarg_prefix == "thinker_"
    assert specs["qwen2_vl"].required_inputs == specs["qwen2_5_vl"].required_inputs == ("mm_token_type_ids",)
    assert specs["qwen2_5_omni_thinker"].modalities == ("text", "image", "audio")


def test_adapters_is_data_only():
    """No importable package named `adapters` (an unrelated PyPI library owns that name)."""
    assert not list(ADAPTERS.glob("*.py"))
    assert not (REPO / "safegate" / "adapters").exists()
    assert not (REPO / "adapters" / "__init__.py").exists()


@pytest.mark.parametrize(
    "text, error",
    [
        ('model_type = "x"\nlayerz = "layers"\n', "unknown spec field"),
        ('decoder = "model"\n', "model_type"),
        ('model_type = "x"\nmodalities = ["text", "smell"]\n', "modalities"),
        ('model_type = "x"\nmodalities = ["text", "image"]\n', "placeholders.image"),
        ('model_type = "x"\n[placeholders]\npicture = "image_token_id"\n', "placeholders"),
    ],
)
def test_bad_specs_are_rejected_with_the_field_named(tmp_path, text, error):
    path = tmp_path / "x.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=error):
        ArchSpec.from_toml(path)


@pytest.mark.parametrize("arch", ARCHS)
def test_multimodal_backbones_resolve_to_the_text_model(arch):
    model, _ = tiny_multimodal(arch)
    resolved = resolve(model)
    assert resolved.root is unwrap(model)
    assert resolved.root is (model.thinker if arch == "omni" else model)
    assert resolved.decoder_path == "model.language_model"
    assert resolved.decoder is resolved.root.model.language_model
    assert resolved.norm is resolved.decoder.norm and len(resolved.layers) == 2
    assert resolved.embed is resolved.decoder.embed_tokens and resolved.head is resolved.root.lm_head
    assert not resolved.tied
    names = [n for n, m in resolved.root.named_modules() if isinstance(m, torch.nn.Linear)]
    targets = [n for n in names if re.fullmatch(resolved.lora_target, n)]
    assert targets and all(n.startswith("model.language_model.layers.") for n in targets)
    # the towers have q_proj/v_proj-like Linear layers too (LLaVA's CLIP, Omni's audio tower): none is matched
    assert not [n for n in targets if any(t in n for t in TOWERS)]


def test_unknown_architecture_error_lists_supported_types_and_readme(monkeypatch):
    class NoDecoder(torch.nn.Module):
        config = type("C", (), {"model_type": "mystery"})()

    with pytest.raises(ValueError) as err:
        resolve(NoDecoder())
    message = str(err.value)
    assert "adapters/README.md" in message and "'mystery'" in message
    for model_type in EXPECTED:
        assert model_type in message
    # the full Omni model is neither plain decoder-only nor found generically: only its spec makes it work
    model, _ = tiny_multimodal("omni")
    without_omni = {k: v for k, v in load_specs().items() if k != "qwen2_5_omni"}
    monkeypatch.setattr(arch_module, "load_specs", lambda folder=None: without_omni)
    with pytest.raises(ValueError, match=r"qwen2_5_omni'.*adapters/README.md"):
        resolve(model)


def test_plain_decoder_without_spec_is_found_generically(monkeypatch):
    model, tok = tiny_model_and_tokenizer("qwen2")
    monkeypatch.setattr(arch_module, "load_specs", lambda folder=None: {})
    resolved = resolve(model)
    assert resolved.decoder is model.model and resolved.norm is model.model.norm
    assert re.fullmatch(resolved.lora_target, "model.layers.1.self_attn.q_proj")


def test_required_inputs_are_checked_only_with_multimodal_inputs():
    spec = load_specs()["qwen2_5_vl"]
    model, tok = tiny_multimodal("qwen2_5_vl")
    batch = multimodal_batch("qwen2_5_vl", tok, ["look", "hi"], images=[True, False])
    check_required_inputs(spec, batch)
    without = {k: v for k, v in batch.items() if k != "mm_token_type_ids"}
    with pytest.raises(ValueError, match="mm_token_type_ids"):
        check_required_inputs(spec, without)
    check_required_inputs(spec, {k: batch[k] for k in ("input_ids", "attention_mask")})  # text only: fine
    # why it matters: Qwen2.5-VL silently changes its positions (and every state the gate reads) without it
    with torch.no_grad():
        assert not torch.allclose(model(**batch).logits, model(**without).logits, atol=1e-4)


def _build_wheel(tmp_path: Path) -> Path:
    """Build the wheel from a copy of the sources (the shared tree gets no build/ or egg-info)."""
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(REPO / "pyproject.toml", src)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "safegate", src / "safegate", ignore=ignore)
    shutil.copytree(ADAPTERS, src / "adapters", ignore=ignore)
    readme = REPO / "README.md"
    (src / "README.md").write_text(readme.read_text() if readme.exists() else "# safegate\n")
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    for package in packages:  # packages other work has not created yet must not break this check
        folder = src / package.replace(".", "/")
        if package != "safegate.adapters" and not folder.exists():
            folder.mkdir(parents=True)
            (folder / "__init__.py").write_text("")
    out = tmp_path / "dist"
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)]
    subprocess.run(cmd, check=True, capture_output=True, cwd=tmp_path, timeout=120)
    (wheel,) = out.glob("safegate-*.whl")
    return wheel


def test_wheel_ships_the_same_specs_as_the_checkout(tmp_path):
    wheel = _build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as zf:
        shipped = {Path(n).name: zf.read(n) for n in zf.namelist() if n.startswith("safegate/adapters/")}
        assert not [n for n in zf.namelist() if n.startswith("adapters/")], "a top-level `adapters` package shipped"
        zf.extractall(tmp_path / "site")
    checkout = {p.name: p.read_bytes() for p in ADAPTERS.iterdir() if p.suffix in (".toml", ".md")}
    assert shipped == checkout
    assert load_specs(str(tmp_path / "site" / "safegate" / "adapters")) == load_specs(str(ADAPTERS))
    # an installed wheel reads its own copy; a checkout reads the repo folder
    assert specs_dir() == ADAPTERS
    probe = "import safegate.modeling.arch as a; print(a.specs_dir()); print(','.join(sorted(a.load_specs())))"
    env = {"PYTHONPATH": str(tmp_path / "site"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120, check=True
    ).stdout.split()
    assert out[0] == str(tmp_path / "site" / "safegate" / "adapters")
    assert out[1].split(",") == sorted(load_specs(str(ADAPTERS)))


def test_attach_accepts_a_real_processor_and_adds_tokens_to_its_tokenizer():
    from safegate.testing.multimodal import tiny_llava_processor

    model, tok = tiny_multimodal("llava")
    processor = tiny_llava_processor(tok)
    before = len(tok)
    gated = safegate.attach(model, processor, safegate.GateConfig(**SMALL))
    assert gated.processor is processor and gated.tokenizer is processor.tokenizer
    assert len(processor.tokenizer) == before + 2
    assert processor.tokenizer.convert_ids_to_tokens(gated.unsafe_token_id) == "<|unsafe|>"
