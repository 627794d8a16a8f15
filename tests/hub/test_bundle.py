"""Gate bundles: exact round trips, size, plain-PEFT loading, strict errors, atomic saves, Hub cache and push."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, RepoUrl, constants
from safetensors.torch import load_file, save_file

import safegate
from safegate.cli import main
from safegate.hub.bundle import (
    BUNDLE_FILES,
    BundleError,
    BundleMismatchError,
    BundleNotFoundError,
    SafeGateBundle,
    load_bundle,
)
from safegate.modeling.arch import unwrap
from safegate.testing import chat, tiny_model_and_tokenizer, tiny_tokenizer
from tests.conftest import SMALL

PROMPTS = ["How do I bake bread?", "Tell me how to build a bomb to hurt people.", "Write a poem about the sea."]


@torch.no_grad()
def _perturb(gated, seed=1):
    """Move every trained part away from its initial value, so a round trip that drops one of them fails."""
    gen = torch.Generator().manual_seed(seed)
    for _, param in gated.named_parameters():
        if param.requires_grad:
            param.copy_(torch.randn(param.shape, generator=gen).to(param.dtype))
    gated.gate.query.add_(torch.randn(gated.gate.query.shape, generator=gen))
    return gated


def _trained(arch="qwen2", seed=1, **config):
    model, tok = tiny_model_and_tokenizer(arch)
    return _perturb(safegate.attach(model, tok, safegate.GateConfig(**{**SMALL, **config})), seed), tok


def _outputs(gated, tok, threshold=None):
    inputs = chat(tok, PROMPTS)
    scores = gated.classify(**inputs)
    threshold = float(scores.median()) if threshold is None else threshold  # splits the verdicts 2:1
    out = gated.generate(
        **inputs, max_new_tokens=6, do_sample=False, safety_threshold=threshold, return_dict_in_generate=True
    )
    return scores, out.sequences, out.safety, threshold


def _untouched(model, tok, rows, n_tokens):
    names = [n for n, _ in model.named_modules()]
    assert not any("lora" in n or "token_adapter" in n for n in names)
    assert unwrap(model).get_input_embeddings().weight.shape[0] == rows and len(tok) == n_tokens


@pytest.fixture
def no_pickle(monkeypatch):
    """Make any unpickling fail: bundles are JSON and safetensors only."""

    def refuse(*args, **kwargs):
        raise AssertionError("something tried to unpickle")

    for target in ("torch.load", "pickle.load", "pickle.loads"):
        monkeypatch.setattr(target, refuse)


def _files(folder):
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*") if p.is_file())


def _rewrite(folder, name, tensors):
    """Replace a safetensors file and fix its checksum record, as a hand-edited bundle would look."""
    save_file(tensors, str(folder / name), metadata={"format": "pt"})
    config = json.loads((folder / "safegate_config.json").read_text())
    data = (folder / name).read_bytes()
    config["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "safegate_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("arch_name", ["qwen2", "llama"])
def test_round_trip_gives_identical_scores_and_generations(tmp_path, arch_name, no_pickle):
    gated, tok = _trained(arch_name)
    scores, sequences, safety, threshold = _outputs(gated, tok)
    assert len(set(safety)) == 2 and len(set(scores.tolist())) == 3
    folder = gated.save_bundle(tmp_path / "gate")
    assert _files(folder) == sorted(BUNDLE_FILES) and not (folder / "config.json").exists()

    model, fresh_tok = tiny_model_and_tokenizer(arch_name)
    untrained = _outputs(safegate.attach(*tiny_model_and_tokenizer(arch_name), safegate.GateConfig(**SMALL)), tok)
    assert not torch.equal(untrained[0], scores)
    loaded = safegate.load_bundle(model, fresh_tok, folder)  # the lazy top-level export
    assert loaded.arch.tied == (arch_name == "qwen2")
    new_scores, new_sequences, new_safety, _ = _outputs(loaded, fresh_tok, threshold)
    assert torch.equal(new_scores, scores) and torch.equal(new_sequences, sequences) and new_safety == safety
    assert loaded.gate_config == gated.gate_config
    assert torch.equal(loaded.gate.query, gated.gate.query)


@pytest.mark.parametrize("arch_name", ["qwen2", "llama"])
def test_bundle_bytes_are_the_trainable_bytes(tmp_path, arch_name):
    gated, _ = _trained(arch_name)
    folder = gated.save_bundle(tmp_path / "gate")
    trainable = sum(p.numel() * p.element_size() for p in gated.parameters() if p.requires_grad)
    hidden, rows = gated.arch.embed.weight.shape[1], gated.arch.embed.weight.shape[0]
    # extras: the frozen query and standardisation (mean, inverse std) buffers, and the adapter's copy of the
    # token rows (so that plain PEFT works)
    copies = (1 if gated.arch.tied else 2) * 2 * hidden * 4
    tensors = {**load_file(folder / "safegate.safetensors"), **load_file(folder / "adapter/adapter_model.safetensors")}
    payload = sum(t.numel() * t.element_size() for t in tensors.values())
    assert payload == trainable + 3 * hidden * 4 + copies
    on_disk = sum((folder / n).stat().st_size for n in ("safegate.safetensors", "adapter/adapter_model.safetensors"))
    assert payload < on_disk < payload + 3000  # safetensors headers only
    assert all(rows not in t.shape for t in tensors.values()), "a full embedding/head matrix was saved"


@pytest.mark.parametrize("arch_name", ["qwen2", "llama"])
def test_adapter_loads_in_plain_peft(tmp_path, arch_name, no_pickle):
    from peft import PeftModel

    gated, _ = _trained(arch_name)
    folder = gated.save_bundle(tmp_path / "gate")
    base, tok = tiny_model_and_tokenizer(arch_name)
    ids = safegate.modeling.tokens.add_safety_tokens(tok, "<|safe|>", "<|unsafe|>")
    base.resize_token_embeddings(max(ids) + 1)
    plain = PeftModel.from_pretrained(base, folder / "adapter")
    inputs = chat(tok, PROMPTS)
    inputs["input_ids"][:, -1] = ids[1]  # read the unsafe token's embedding row as well
    with torch.no_grad():  # fp32 tolerance: PEFT rebuilds the matrix, safegate computes the two columns apart
        torch.testing.assert_close(plain(**inputs).logits, gated(**inputs).logits, rtol=1e-5, atol=1e-5)


def test_token_ids_are_resolved_from_strings(tmp_path):
    model, tok = tiny_model_and_tokenizer("qwen2", vocab_size=len(tiny_tokenizer()) + 8)  # padded, like Qwen
    gated = _perturb(safegate.attach(model, tok, safegate.GateConfig(**SMALL)))
    folder = gated.save_bundle(tmp_path / "gate")
    model2, tok2 = tiny_model_and_tokenizer("qwen2", vocab_size=len(tiny_tokenizer()) + 8)
    tok2.add_tokens(["<extra>"])  # the safety tokens get other ids in this tokenizer
    loaded = load_bundle(model2, tok2, folder)
    assert (loaded.safe_token_id, loaded.unsafe_token_id) == (gated.safe_token_id + 1, gated.unsafe_token_id + 1)
    assert torch.equal(loaded.classify(**chat(tok2, PROMPTS)), gated.classify(**chat(tok, PROMPTS)))


def test_tokens_only_bundle_round_trip(tmp_path):
    gated, tok = _trained("llama", lora_r=0)
    folder = gated.save_bundle(tmp_path / "gate")
    assert set(load_file(folder / "safegate.safetensors")) >= {"tokens.embed.<|safe|>", "tokens.head.<|unsafe|>"}
    model, fresh_tok = tiny_model_and_tokenizer("llama")
    loaded = load_bundle(model, fresh_tok, folder)
    inputs = chat(tok, PROMPTS)
    assert torch.equal(loaded.classify(**inputs), gated.classify(**inputs))
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, gated(**inputs).logits)
    again = load_bundle(loaded.detach(), fresh_tok, folder)  # the tokenizer already holds the tokens: reused
    assert torch.equal(again.classify(**inputs), gated.classify(**inputs))


def test_resave_and_crash_keep_a_valid_bundle(tmp_path, monkeypatch):
    first, tok = _trained("qwen2", seed=1)
    second, _ = _trained("qwen2", seed=2)
    target = tmp_path / "gate"
    first.save_bundle(target)
    second.save_bundle(target)  # replaces a bundle in place
    inputs = chat(tok, PROMPTS)
    assert torch.equal(load_bundle(*tiny_model_and_tokenizer("qwen2"), target).classify(**inputs),
                       second.classify(**inputs))  # fmt: skip
    before = {n: (target / n).read_bytes() for n in BUNDLE_FILES}

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safegate.hub.bundle.save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        first.save_bundle(target)
    with pytest.raises(OSError, match="disk full"):
        first.save_bundle(tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gate"]  # no temp folder, no half bundle
    assert {n: (target / n).read_bytes() for n in BUNDLE_FILES} == before


def test_save_refuses_files_and_foreign_folders(tmp_path):
    gated, _ = _trained("qwen2")
    (tmp_path / "file").write_text("x")
    with pytest.raises(BundleError, match="it is a file"):
        gated.save_bundle(tmp_path / "file")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(BundleError, match="not a safegate bundle"):
        gated.save_bundle(tmp_path / "mine")
    with pytest.raises(ValueError, match="root config.json"):
        SafeGateBundle.from_model(gated).save_pretrained(tmp_path / "x", config={"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "mine"]
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me" and (tmp_path / "file").read_text() == "x"


def _truncate(folder):
    data = (folder / "safegate.safetensors").read_bytes()
    (folder / "safegate.safetensors").write_bytes(data[: len(data) // 2])


def _truncate_recorded(folder):
    data = (folder / "adapter/adapter_model.safetensors").read_bytes()[:-100]
    (folder / "adapter/adapter_model.safetensors").write_bytes(data)
    config = json.loads((folder / "safegate_config.json").read_text())
    entry = config["files"]["adapter/adapter_model.safetensors"]
    entry.update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
    (folder / "safegate_config.json").write_text(json.dumps(config))


def _flip_byte(folder):
    path = folder / "adapter/adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))


def _edit_config(**changes):
    def edit(folder):
        config = json.loads((folder / "safegate_config.json").read_text())
        config.update(changes)
        (folder / "safegate_config.json").write_text(json.dumps(config))

    return edit


def _edit_adapter_rows(folder):
    tensors = load_file(folder / "adapter/adapter_model.safetensors")
    key = next(k for k in tensors if "trainable_tokens_delta" in k)
    tensors[key] = tensors[key] + 1
    _rewrite(folder, "adapter/adapter_model.safetensors", tensors)


def _drop_gate_tensor(folder):
    tensors = load_file(folder / "safegate.safetensors")
    del tensors["tokens.embed.<|unsafe|>"]
    _rewrite(folder, "safegate.safetensors", tensors)


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda f: (f / "adapter/adapter_model.safetensors").unlink(), "missing .*adapter_model.safetensors"),
        (lambda f: (f / "safegate_config.json").unlink(), "missing .*safegate_config.json"),
        (_truncate, "truncated or was replaced"),
        (_truncate_recorded, "not a readable safetensors file"),
        (_flip_byte, "does not match its sha256"),
        (lambda f: (f / "safegate_config.json").write_text('{"format": "safegate-bun'), "not valid JSON"),
        (_edit_config(schema_version=99), "unknown bundle `schema_version` 99"),
        (_edit_config(format="other"), "not a safegate bundle config"),
        (_edit_config(threshold=0.3), "`threshold` 0.3 differs"),
        (_edit_adapter_rows, "token rows in adapter/adapter_model.safetensors differ"),
        (_drop_gate_tensor, r"missing tensors \['tokens.embed.<\|unsafe\|>'\]"),
        (lambda f: (f / "adapter/adapter_config.json").write_text('{"peft_type": "NOPE"}'), "not a valid PEFT"),
    ],
)
def test_bad_bundles_raise_clear_errors_and_leave_the_model_alone(tmp_path, corrupt, message):
    gated, _ = _trained("llama")
    folder = gated.save_bundle(tmp_path / "gate")
    corrupt(folder)
    model, tok = tiny_model_and_tokenizer("llama")
    rows, n_tokens = model.get_input_embeddings().weight.shape[0], len(tok)
    with pytest.raises(BundleError, match=message):
        load_bundle(model, tok, folder)
    _untouched(model, tok, rows, n_tokens)


def _del_module(model, tok):
    del model.model.layers[1].self_attn.v_proj
    return model, tok


def _spellable_token(model, tok):
    tok.add_tokens(["<|unsafe|>"])  # an ordinary added token: text can produce its id
    return model, tok


def _foreign_tokenizer(model, tok):
    tok.add_tokens(["<a>", "<b>", "<c>"])  # ids the model has no rows for
    return model, tok


@pytest.mark.parametrize(
    "target, field, bundle_value, model_value",
    [
        (lambda: tiny_model_and_tokenizer("llama", tie_word_embeddings=True), "gated_model_type", "qwen2", "llama"),
        (lambda: tiny_model_and_tokenizer("qwen2", hidden_size=32), "hidden_size", 64, 32),
        (lambda: tiny_model_and_tokenizer("qwen2", num_hidden_layers=3), "num_layers", 2, 3),
        (lambda: tiny_model_and_tokenizer("qwen2", vocab_size=600), "vocab_rows", len(tiny_tokenizer()), 600),
        (lambda: tiny_model_and_tokenizer("qwen2", tie_word_embeddings=False), "tied", True, False),
        (lambda: _del_module(*tiny_model_and_tokenizer("qwen2")), "lora_target_modules", None, None),
        (lambda: _spellable_token(*tiny_model_and_tokenizer("qwen2")), "unsafe_token", "<|unsafe|>", None),
        (lambda: _foreign_tokenizer(*tiny_model_and_tokenizer("qwen2")), "tokenizer_vocab", None, None),
    ],
)
def test_backbone_mismatch_names_field_and_both_values(tmp_path, target, field, bundle_value, model_value):
    gated, _ = _trained("qwen2")
    folder = gated.save_bundle(tmp_path / "gate")
    model, tok = target()
    rows, n_tokens = model.get_input_embeddings().weight.shape[0], len(tok)
    with pytest.raises(BundleMismatchError) as info:
        load_bundle(model, tok, folder)
    err = info.value
    assert isinstance(err, ValueError) and err.field == field and f"`{field}`" in str(err)
    for expected, got in ((bundle_value, err.bundle_value), (model_value, err.model_value)):
        assert expected is None or expected == got
        assert repr(got) in str(err)
    _untouched(model, tok, rows, n_tokens)


def _tiny_omni(hidden=64, layers=2):
    """Full Qwen2.5-Omni (thinker gated); other `hidden`/`layers` stand in for the 7B against the 3B."""
    from transformers import Qwen2_5OmniForConditionalGeneration

    from safegate.testing.multimodal import tiny_config

    tok = tiny_tokenizer(multimodal=True)
    config = tiny_config("omni", tok)
    thinker = config.thinker_config
    thinker.text_config.num_hidden_layers = layers
    thinker.text_config.layer_types = ["full_attention"] * layers
    thinker.text_config.hidden_size = thinker.vision_config.out_hidden_size = thinker.audio_config.output_dim = hidden
    torch.manual_seed(0)
    model = Qwen2_5OmniForConditionalGeneration(config).eval()
    model.thinker.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def test_full_omni_loads_and_refuses_the_other_size(tmp_path):
    from safegate.testing.multimodal import tiny_multimodal

    model, tok = _tiny_omni()
    gated = _perturb(safegate.attach(model, tok, safegate.GateConfig(**SMALL)))
    folder = gated.save_bundle(tmp_path / "omni-3b-gate")
    config = json.loads((folder / "safegate_config.json").read_text())
    assert config["backbone"]["model_type"] == "qwen2_5_omni" and config["backbone"]["gated_module"] == "thinker"
    inputs = chat(tok, PROMPTS)
    loaded = load_bundle(*_tiny_omni(), folder)
    assert torch.equal(loaded.classify(**inputs), gated.classify(**inputs))
    thinker_only = load_bundle(*tiny_multimodal("omni_thinker"), folder)  # same gated module, loaded on its own
    assert torch.equal(thinker_only.classify(**inputs), gated.classify(**inputs))

    big, big_tok = _tiny_omni(hidden=96, layers=3)
    with pytest.raises(BundleMismatchError, match="`hidden_size` is 64 in the bundle, 96 in the model") as info:
        load_bundle(big, big_tok, folder)
    assert "`num_layers` 2 vs 3" in str(info.value)
    _untouched(big, big_tok, big.thinker.get_input_embeddings().weight.shape[0], len(big_tok))


def _populate_cache(cache, repo_id, folder, sha, refs=("main",)):
    """The layout `snapshot_download` reads: blobs, snapshots/<sha>/ symlinks, refs/<name> -> sha."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    for path in Path(folder).rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(data)
            link = repo / "snapshots" / sha / path.relative_to(folder)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(sha)


def test_hub_repo_ids_resolve_from_the_cache_offline(tmp_path):
    assert constants.HF_HUB_OFFLINE, "tests must run with HF_HUB_OFFLINE=1"
    first, tok = _trained("qwen2", seed=1)
    second, _ = _trained("qwen2", seed=2)
    cache = tmp_path / "hub"
    _populate_cache(cache, "me/my-gate", first.save_bundle(tmp_path / "v1"), "a" * 40, refs=("v1",))
    _populate_cache(cache, "me/my-gate", second.save_bundle(tmp_path / "v2"), "b" * 40)
    inputs = chat(tok, PROMPTS)
    latest = load_bundle(*tiny_model_and_tokenizer("qwen2"), "me/my-gate", cache_dir=cache)
    assert torch.equal(latest.classify(**inputs), second.classify(**inputs))
    tagged = load_bundle(*tiny_model_and_tokenizer("qwen2"), "me/my-gate", revision="v1", cache_dir=cache)
    assert torch.equal(tagged.classify(**inputs), first.classify(**inputs))
    by_sha = SafeGateBundle.from_pretrained("me/my-gate", revision="a" * 40, cache_dir=cache, local_files_only=True)
    assert by_sha.folder == cache / "models--me--my-gate" / "snapshots" / ("a" * 40)
    with pytest.raises(BundleNotFoundError, match="offline") as info:
        load_bundle(*tiny_model_and_tokenizer("qwen2"), "me/other-gate", cache_dir=cache)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ValueError)
    with pytest.raises(BundleNotFoundError):
        load_bundle(*tiny_model_and_tokenizer("qwen2"), str(tmp_path / "no" / "such" / "folder"))


def test_push_uploads_exactly_the_bundle_folder(tmp_path, monkeypatch):
    gated, _ = _trained("llama")
    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create"] = dict(kwargs, repo_id=repo_id)
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        files = {p: (Path(folder_path) / p).read_bytes() for p in _files(folder_path)}
        calls["upload"] = dict(kwargs, repo_id=repo_id, files=files)
        return f"https://huggingface.co/{repo_id}/commit/123"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    url = gated.push_to_hub("me/my-gate", private=True, evaluation={"JB-Prompt": {"asr": 0.0}})
    assert url == "https://huggingface.co/me/my-gate/commit/123"
    assert calls["create"]["private"] is True and calls["create"]["exist_ok"] is True
    assert calls["upload"]["repo_id"] == "me/my-gate" and calls["upload"]["repo_type"] == "model"
    folder = safegate.hub.bundle.save_bundle(gated, tmp_path / "gate", evaluation={"JB-Prompt": {"asr": 0.0}})
    assert calls["upload"]["files"] == {p: (folder / p).read_bytes() for p in _files(folder)}
    card = calls["upload"]["files"]["README.md"].decode()
    assert "library_name: safegate" in card and "2604.00310" in card and "| JB-Prompt | 0.0 |" in card


def test_cli_info_and_export_report_sizes_in_bytes(tmp_path, capsys):
    gated, _ = _trained("qwen2")
    source = gated.save_bundle(tmp_path / "gate", recipe="tiny-recipe")
    assert main(["info", str(source)]) == 0
    out = capsys.readouterr().out
    sizes = {n: (source / n).stat().st_size for n in BUNDLE_FILES}
    for name, size in sizes.items():
        assert any(line.split() == [name, str(size)] for line in out.splitlines()), name
    assert f"total {sum(sizes.values())}".split() in [line.split() for line in out.splitlines()]
    assert "recipe: tiny-recipe" in out and "hidden_size=64" in out

    out_dir = tmp_path / "re-export"
    args = ["export", "--from-bundle", str(source), "--model", "tiny:qwen2", "--bundle-out", str(out_dir)]
    assert main(args) == 0
    for name in BUNDLE_FILES:  # checked against the backbone, then written again byte for byte
        assert (out_dir / name).read_bytes() == (source / name).read_bytes(), name
    assert "total" in capsys.readouterr().out

    assert main(["export", "--from-bundle", str(source), "--bundle-out", str(tmp_path / "t"), "--threshold=.3"]) == 0
    assert SafeGateBundle.from_pretrained(tmp_path / "t").gate_config.threshold == 0.3
    assert main(["export", "--model", "tiny:llama", "--lora-r", "2", "--bundle-out", str(tmp_path / "fresh")]) == 0
    assert "untrained" in capsys.readouterr().out
    assert json.loads((tmp_path / "fresh" / "adapter/adapter_config.json").read_text())["r"] == 2

    shutil.copy(source / "README.md", source / "safegate.safetensors")
    assert main(["info", str(source)]) == 2
    assert "truncated or was replaced" in capsys.readouterr().err
    args = ["export", "--from-bundle", str(out_dir), "--model", "tiny:llama", "--bundle-out", str(tmp_path / "x")]
    assert main(args) == 2
    assert "`gated_model_type` is 'qwen2' in the bundle, 'llama' in the model" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
