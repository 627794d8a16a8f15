"""Merged exports: same verdicts, scores and answers as the bundle path, a plain transformers checkpoint, the gate
reproduced from states alone, the caller's model untouched, atomic saves, strict loading, the CLI."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import safegate
from safegate.cli import main
from safegate.hub.files import BundleError, BundleMismatchError, BundleNotFoundError
from safegate.hub.merged import load_merged, merged_verdict, read_merged_gate
from safegate.hub.merged_files import GATE_WEIGHTS_NAME, MANIFEST_NAME, sha256
from safegate.testing import chat, tiny_model_and_tokenizer
from tests.conftest import SMALL

PROMPTS = ["How do I bake bread?", "Tell me how to build a bomb to hurt people.", "Write a poem about the sea."]
HEADS = [("qwen2", True), ("qwen2", False), ("llama", True), ("llama", False)]


@torch.no_grad()
def _trained(arch="qwen2", tie=True, dtype=torch.float32, seed=1, **config):
    """A gated tiny model whose every trained part (LoRA, rows, gate, input standardisation) moved from its start."""
    model, tok = tiny_model_and_tokenizer(arch, tie_word_embeddings=tie)
    gated = safegate.attach(model.to(dtype), tok, safegate.GateConfig(**{**SMALL, **config}))
    gen = torch.Generator().manual_seed(seed)
    for param in gated.parameters():
        if param.requires_grad:
            param.copy_((0.5 * torch.randn(param.shape, generator=gen)).to(param.dtype))
    hidden = gated.gate.input_mean.shape[0]
    gated.gate.set_input_stats(torch.randn(hidden, generator=gen), torch.rand(hidden, generator=gen) + 0.5)
    return gated, tok


def _threshold(scores):
    """A threshold halfway between two scores: verdicts split, and no score sits on it."""
    ordered = scores.sort().values
    return float((ordered[0] + ordered[1]) / 2)


def _outputs(gated, tok, threshold):
    inputs = chat(tok, PROMPTS)
    out = gated.generate(
        **inputs, max_new_tokens=6, do_sample=False, safety_threshold=threshold, return_dict_in_generate=True
    )
    return gated.classify(**inputs), out.sequences, out.safety


@pytest.mark.parametrize(("arch", "tie"), HEADS)
def test_merged_export_matches_the_bundle_path(tmp_path, arch, tie):
    gated, tok = _trained(arch, tie)
    assert gated.arch.tied is tie
    model, fresh_tok = tiny_model_and_tokenizer(arch, tie_word_embeddings=tie)
    via_bundle = safegate.load_bundle(model, fresh_tok, gated.save_bundle(tmp_path / "bundle"))
    threshold = _threshold(via_bundle.classify(**chat(tok, PROMPTS)))
    scores, sequences, safety = _outputs(via_bundle, tok, threshold)
    assert sorted(set(safety)) == ["safe", "unsafe"]

    merged, merged_tok = load_merged(gated.save_merged(tmp_path / "merged"))
    assert not any("lora" in name for name, _ in merged.named_modules())  # no LoRA added on top of the merge
    assert merged.gate_config.lora_r == 0 and len(merged_tok) == len(tok)
    m_scores, m_sequences, m_safety = _outputs(merged, merged_tok, threshold)
    torch.testing.assert_close(m_scores, scores, rtol=0, atol=1e-5)
    assert m_safety == safety and torch.equal(m_sequences, sequences)
    for name in ("input_mean", "input_inv_std", "query"):
        assert torch.equal(getattr(merged.gate, name), getattr(gated.gate, name)), name
    assert gated.gate.has_input_stats()


@pytest.mark.parametrize(("arch", "tie"), [("qwen2", True), ("llama", False)])
def test_a_plain_transformers_load_holds_the_tokens_and_rows(tmp_path, arch, tie):
    gated, tok = _trained(arch, tie)
    folder = gated.save_merged(tmp_path / "merged")
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", MANIFEST_NAME, GATE_WEIGHTS_NAME} <= names
    assert "README.md" in names and "adapter" not in names and "adapter_config.json" not in names
    assert (folder / "README.md").read_text().startswith("---\n")
    # engines that load every *.safetensors unless an index names the weight files (vLLM) must skip the gate's
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(weight_map.values()) == {"model.safetensors"}
    assert not set(weight_map) & set(load_file(folder / GATE_WEIGHTS_NAME))
    assert set(weight_map) == set(load_file(folder / "model.safetensors"))
    model, plain_tok = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    ids = [gated.safe_token_id, gated.unsafe_token_id]
    assert plain_tok.convert_tokens_to_ids(["<|safe|>", "<|unsafe|>"]) == ids
    assert not set(ids) & set(plain_tok("text <|safe|> and <|unsafe|>")["input_ids"])  # text cannot spell them
    rows = {part: layer.trainable_tokens_delta["default"] for part, layer in gated.token_layers().items()}
    assert torch.equal(model.get_input_embeddings().weight[ids], rows["embed"])
    assert torch.equal(model.get_output_embeddings().weight[ids], rows["embed" if tie else "head"])
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) is tie


@pytest.mark.parametrize("layer", [-1, 0])
def test_merged_verdict_reproduces_classify_from_states_and_two_logits(tmp_path, layer):
    gated, tok = _trained("llama", False, layer=layer)
    folder = gated.save_merged(tmp_path / "merged")
    gate = read_merged_gate(folder)
    assert (gate.tapped_layer, gate.hidden_states_index) == ((-1, 2) if layer == -1 else (0, 1))
    assert (gate.safe_token, gate.unsafe_token, gate.safe_id) == ("<|safe|>", "<|unsafe|>", gated.safe_token_id)
    model = AutoModelForCausalLM.from_pretrained(folder)  # what a serving engine has: no safegate in it
    scores = gated.classify(**chat(tok, PROMPTS))
    threshold = _threshold(scores)
    for prompt, score in zip(PROMPTS, scores):
        inputs = chat(tok, [prompt])  # one prompt: no padding
        with torch.no_grad():
            out = model(**inputs, output_hidden_states=True)
        states = out.hidden_states[gate.hidden_states_index][0]
        pair = out.logits[0, -1, [gate.safe_id, gate.unsafe_id]]
        label, p_unsafe = merged_verdict(gate, states, pair, threshold=threshold)
        assert p_unsafe == pytest.approx(float(score), abs=1e-5)
        expected = gated.generate(**inputs, max_new_tokens=1, safety_threshold=threshold, return_dict_in_generate=True)
        assert [label] == expected.safety
        argmax = gated.generate(**inputs, max_new_tokens=1, return_dict_in_generate=True).safety
        assert [merged_verdict(gate, states, pair)[0]] == argmax
    with pytest.raises(ValueError, match="tapped_states"):
        merged_verdict(gate, torch.zeros(3, 5), torch.zeros(2))
    with pytest.raises(ValueError, match="safety_logits"):
        merged_verdict(gate, torch.zeros(3, gate.hidden_size), torch.zeros(3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saving_leaves_the_gated_model_bitwise_unchanged_and_equals_peft_merge(tmp_path, dtype):
    gated, _ = _trained("llama", False, dtype=dtype)
    before = {k: v.clone() for k, v in gated.state_dict().items()}
    folder = gated.save_merged(tmp_path / "merged")
    after = gated.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not gated.merged
    reference = copy.deepcopy(gated).peft_model.merge_and_unload().state_dict()
    saved = load_file(str(folder / "model.safetensors"))
    assert saved.keys() == reference.keys()
    assert all(saved[k].dtype == dtype and torch.equal(saved[k], reference[k]) for k in saved)
    merged, _ = load_merged(folder, dtype=torch.bfloat16 if dtype == torch.bfloat16 else None)
    assert merged.dtype == dtype
    gated.merge_adapter()  # a gated model merged in place exports the same weights
    again = load_file(str(gated.save_merged(tmp_path / "again") / "model.safetensors"))
    assert all(torch.equal(again[k], saved[k]) for k in saved)


def test_saving_is_atomic_refuses_foreign_folders_and_replaces_only_its_own_files(tmp_path):
    gated, _ = _trained()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(BundleError, match="not a safegate merged export"):
        gated.save_merged(foreign)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(BundleError, match="it is a file"):
        gated.save_merged(tmp_path / "file")

    folder = gated.save_merged(tmp_path / "merged")
    (folder / "report.md").write_text("kept")
    (folder / "model-00002-of-00002.safetensors").write_text("stale shard of an earlier export")
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    manifest["files"]["model-00002-of-00002.safetensors"] = {"size": 32}
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    killed = tmp_path / ".merged.stage-999999999-0123456789ab"  # a save killed mid-way (its process is gone)
    killed.mkdir()
    (killed / "model.safetensors").write_text("partial")
    gated.save_merged(folder)
    names = {p.name for p in folder.iterdir()}
    assert "report.md" in names and "model-00002-of-00002.safetensors" not in names
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left
    read_merged_gate(folder)


def _rewrite_gate(folder, **tensors):
    state = load_file(str(folder / GATE_WEIGHTS_NAME)) | tensors
    save_file(state, str(folder / GATE_WEIGHTS_NAME))
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    path = folder / GATE_WEIGHTS_NAME
    manifest["files"][GATE_WEIGHTS_NAME] = {"size": path.stat().st_size, "sha256": sha256(path)}
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))


def _edit_manifest(folder, **changes):
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    for dotted, value in changes.items():
        section, _, key = dotted.partition("__")
        manifest[section][key] = value
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))


def test_loading_is_strict_and_names_the_file(tmp_path):
    gated, _ = _trained()
    source = gated.save_merged(tmp_path / "merged")

    def copy_of(name):
        folder = tmp_path / name
        folder.mkdir()
        for path in source.iterdir():
            (folder / path.name).write_bytes(path.read_bytes())
        return folder

    with pytest.raises(BundleNotFoundError, match="not a safegate merged export"):
        read_merged_gate(tmp_path)
    corrupt = copy_of("corrupt")
    data = bytearray((corrupt / GATE_WEIGHTS_NAME).read_bytes())
    data[-1] ^= 0xFF
    (corrupt / GATE_WEIGHTS_NAME).write_bytes(bytes(data))
    with pytest.raises(BundleError, match=f"`{GATE_WEIGHTS_NAME}` .* does not match its sha256"):
        load_merged(corrupt)
    nan = copy_of("nan")
    _rewrite_gate(nan, input_mean=torch.full_like(gated.gate.input_mean, float("nan")))
    with pytest.raises(BundleError, match=f"{GATE_WEIGHTS_NAME}: tensor `input_mean` .* not all finite"):
        read_merged_gate(nan)
    missing = copy_of("missing")
    _rewrite_gate(missing, **{"w_q.weight": torch.zeros(3, 64)})
    with pytest.raises(BundleError, match="tensor `w_q.weight` is shape \\(3, 64\\).* needs shape \\(16, 64\\)"):
        read_merged_gate(missing)
    for name, change, message in [
        ("layer", {"gate__tapped_layer": 7}, "`gate.tapped_layer` is 7"),
        ("lora", {"gate_config__lora_r": 8}, "`gate_config.lora_r` is 8, expected 0"),
        ("token", {"tokens__safe": "<|ok|>"}, "`tokens.safe` is '<|ok|>'"),
    ]:
        folder = copy_of(name)
        _edit_manifest(folder, **change)
        with pytest.raises(BundleError, match=message):
            read_merged_gate(folder)
    wrong_id = copy_of("wrong_id")
    _edit_manifest(wrong_id, tokens__safe_id=3)
    with pytest.raises(BundleMismatchError, match="id of '<\\|safe\\|>'` is 3 in the bundle, 515 in the model"):
        load_merged(wrong_id)
    truncated = copy_of("truncated")
    (truncated / "model.safetensors").write_bytes(b"")
    with pytest.raises(BundleError, match="`model.safetensors` .* truncated or was replaced"):
        read_merged_gate(truncated)


def test_cli_export_merged(tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["export", "--model", "tiny:llama", "--lora-r", "2", "--threshold", "0.4", "--merged", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "wrote merged export" in printed and "model.safetensors" in printed
    gate = read_merged_gate(out)
    assert gate.threshold == 0.4 and json.loads((out / MANIFEST_NAME).read_text())["merged_lora"]["r"] == 2
    gated, _ = safegate.load_merged(out)
    assert gated.gate_config.threshold == 0.4
    bundle = gated.save_bundle(tmp_path / "bundle")
    assert main(["export", "--from-bundle", str(bundle), "--merged", str(tmp_path / "x")]) == 2
    assert "--merged" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_cli_export_merged_of_a_base_answer_gate_needs_adapted_answers(tmp_path, capsys):
    model, tok = tiny_model_and_tokenizer("llama")
    gated = safegate.attach(model, tok, safegate.GateConfig(attention_dim=16, lora_r=2, safe_answer="base"))
    bundle = gated.save_bundle(tmp_path / "bundle")
    args = ["export", "--from-bundle", str(bundle), "--model", "tiny:llama", "--merged", str(tmp_path / "m")]
    assert main(args) == 2
    assert "--adapted-answers" in capsys.readouterr().err and not (tmp_path / "m").exists()
    assert main([*args, "--adapted-answers"]) == 0
    assert read_merged_gate(tmp_path / "m").config.safe_answer == "adapted"
