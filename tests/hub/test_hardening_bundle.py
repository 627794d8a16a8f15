"""Issue 17, items 9, 11, 12 and 14 (bundles): saving keeps what is not the bundle's, a malformed bundle is refused
with a `BundleError` naming the field or tensor before the model or the tokenizer is touched, a failed load leaves
both exactly as they were, interrupted saves leave no temporary folders, file modes follow the umask, and
`safegate info` never shows a traceback."""

import hashlib
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import safegate
from safegate.cli import main
from safegate.hub.bundle import BUNDLE_FILES, BundleError, SafeGateBundle, load_bundle
from safegate.testing import chat, tiny_model_and_tokenizer
from tests.conftest import SMALL

PROMPTS = ["How do I bake bread?", "Tell me how to build a bomb to hurt people."]
CONFIG = "safegate_config.json"
ADAPTER_CONFIG = "adapter/adapter_config.json"
WEIGHTS = "safegate.safetensors"
ADAPTER_WEIGHTS = "adapter/adapter_model.safetensors"


@torch.no_grad()
def _trained(arch="llama", seed=1):
    model, tok = tiny_model_and_tokenizer(arch)
    gated = safegate.attach(model, tok, safegate.GateConfig(**SMALL))
    gen = torch.Generator().manual_seed(seed)
    for _, param in gated.named_parameters():
        if param.requires_grad:
            param.copy_(torch.randn(param.shape, generator=gen).to(param.dtype))
    return gated, tok


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One trained llama bundle (untied head: embedding and head rows), copied by each test that edits it."""
    gated, _ = _trained()
    return gated.save_bundle(tmp_path_factory.mktemp("bundle") / "gate")


@pytest.fixture
def bundle(saved, tmp_path):
    return Path(shutil.copytree(saved, tmp_path / "gate"))


def _snapshot(model, tok):
    """Everything a failed load must leave as it was: weights (hashed), modules, flags, the tokenizer."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return {
        "state": digest.hexdigest(),
        "modules": [(n, type(m).__name__) for n, m in model.named_modules()],
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "embed_rows": model.get_input_embeddings().weight.shape,
        "head_rows": model.get_output_embeddings().weight.shape,
        "training": model.training,
        "tok_len": len(tok),
        "vocab": tok.get_vocab(),
        "backend": tok.backend_tokenizer.to_str(),
    }


def _assert_untouched(model, tok, before):
    after = _snapshot(model, tok)
    assert not [n for n, _ in model.named_modules() if "lora" in n or "token_adapter" in n], "adapter layers left"
    for key, value in before.items():
        assert after[key] == value, f"a failed load changed the model or tokenizer: {key}"


def _rewrite_tensors(folder, name, edit):
    """Edit a safetensors file and fix its checksum record, as a hand-edited bundle would look."""
    tensors = load_file(folder / name)
    edit(tensors)
    save_file(tensors, str(folder / name), metadata={"format": "pt"})
    config = json.loads((folder / CONFIG).read_text())
    data = (folder / name).read_bytes()
    config["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / CONFIG).write_text(json.dumps(config))


def _set(name, path, value):
    """Set `path` ("a.b", or "a.b=DELETE") in the JSON file `name` of the bundle."""

    def edit(folder):
        data = json.loads((folder / name).read_text())
        *parents, leaf = path.split(".") if path else [None]
        node = data
        for part in parents:
            node = node[part]
        if value is _DELETE:
            del node[leaf]
        else:
            node[leaf] = value
        (folder / name).write_text(json.dumps(data))

    return edit


_DELETE = object()


def _config(path, value):
    return _set(CONFIG, path, value)


def _adapter(path, value):
    return _set(ADAPTER_CONFIG, path, value)


def _tensor(name, key, edit):
    def apply(folder):
        def change(tensors):
            tensors[key] = edit(tensors[key].clone()) if key in tensors else edit(None)

        _rewrite_tensors(folder, name, change)

    return apply


def _first_key(folder_name, contains):
    return lambda folder: next(k for k in load_file(folder / folder_name) if contains in k)


def _lora_key(edit):
    def apply(folder):
        key = _first_key(ADAPTER_WEIGHTS, "lora_A")(folder)
        _tensor(ADAPTER_WEIGHTS, key, edit)(folder)

    return apply


def _both_token_copies(value):
    """Set the safe embedding row to `value` in both copies (so the copies still agree)."""

    def apply(folder):
        _tensor(WEIGHTS, "tokens.embed.<|safe|>", lambda t: t.fill_(value))(folder)
        key = _first_key(ADAPTER_WEIGHTS, "embed_tokens")(folder)
        _tensor(ADAPTER_WEIGHTS, key, lambda t: t.index_fill_(0, torch.tensor([0]), value))(folder)

    return apply


def _nan_at(t):
    t.view(-1)[0] = float("nan")
    return t


def _extra_lora(folder):
    def add(tensors):
        tensors["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"] = torch.zeros(4, 64)

    _rewrite_tensors(folder, ADAPTER_WEIGHTS, add)


MALFORMED = [
    # safegate_config.json: wrong types, out-of-range values, absurd sizes, missing or mistyped sections
    ("lora_dropout_str", _config("gate_config.lora_dropout", "0.5"), "lora_dropout"),
    ("layer_99", _config("gate_config.layer", 99), "layer"),
    ("layer_-4", _config("gate_config.layer", -4), "layer"),
    ("attention_dim_huge", _config("gate_config.attention_dim", 10**15), "attention_dim"),
    ("attention_dim_other", _config("gate_config.attention_dim", 8), "attention_dim"),
    ("members_huge", _config("gate_config.members", 10**9), "members"),
    ("members_other", _config("gate_config.members", 3), "members"),
    ("members_str", _config("gate_config.members", "5"), "members"),
    ("lora_r_other", _config("gate_config.lora_r", 2), "lora_r"),
    ("lora_r_str", _config("gate_config.lora_r", "4"), "lora_r"),
    ("lora_alpha_other", _config("gate_config.lora_alpha", 16), "lora_alpha"),
    ("train_query_str", _config("gate_config.train_query", "yes"), "train_query"),
    ("safety_prompt_int", _config("gate_config.safety_prompt", 5), "safety_prompt"),
    ("lora_target_bad_regex", _config("gate_config.lora_target", "("), "lora_target"),
    ("gate_config_list", _config("gate_config", []), "gate_config"),
    ("files_missing", _config("files", _DELETE), "files"),
    ("files_list", _config("files", []), "files"),
    ("hidden_size_str", _config("backbone.hidden_size", "64"), "hidden_size"),
    ("num_layers_float", _config("backbone.num_layers", 2.0), "num_layers"),
    ("tied_str", _config("backbone.tied", "false"), "tied"),
    ("embed_module_int", _config("backbone.embed_module", 5), "embed_module"),
    ("tokens_disagree", _config("tokens.safe", "<|other|>"), "tokens"),
    # adapter/adapter_config.json
    ("peft_type", _adapter("peft_type", "PROMPT_TUNING"), "peft_type"),
    ("r_str", _adapter("r", "x"), "`r`"),
    ("r_zero", _adapter("r", 0), "`r`"),
    ("r_other", _adapter("r", 8), "`r`"),
    ("alpha_str", _adapter("lora_alpha", "8"), "lora_alpha"),
    ("dropout_str", _adapter("lora_dropout", "0.1"), "lora_dropout"),
    ("target_modules_int", _adapter("target_modules", 5), "target_modules"),
    ("use_dora", _adapter("use_dora", True), "use_dora"),
    ("modules_to_save", _adapter("modules_to_save", ["lm_head"]), "modules_to_save"),
    ("bias_all", _adapter("bias", "all"), "bias"),
    ("token_indices_int", _adapter("trainable_token_indices", 5), "trainable_token_indices"),
    # tensors: non-finite values, wrong shapes, dtypes, extra keys
    ("nan_gate", _tensor(WEIGHTS, "gate.w_q.weight", _nan_at), r"gate\.w_q\.weight"),
    ("inf_gate_bias", _tensor(WEIGHTS, "gate.out.bias", lambda t: t.fill_(float("inf"))), r"gate\.out\.bias"),
    ("nan_query", _tensor(WEIGHTS, "gate.query", _nan_at), r"gate\.query"),
    ("inf_rows", _both_token_copies(float("inf")), r"tokens\.embed\.<\|safe\|>"),
    ("nan_lora", _lora_key(_nan_at), "lora_A"),
    ("gate_shape", _tensor(WEIGHTS, "gate.w_k.weight", lambda t: torch.zeros(8, 64)), r"gate\.w_k\.weight"),
    ("gate_extra", _tensor(WEIGHTS, "gate.extra", lambda t: torch.zeros(3)), r"gate\.extra"),
    ("gate_int", _tensor(WEIGHTS, "gate.w_v.weight", lambda t: t.long()), r"gate\.w_v\.weight"),
    ("lora_extra_module", _extra_lora, "up_proj"),
]


@pytest.mark.parametrize("edit, message", [pytest.param(e, m, id=n) for n, e, m in MALFORMED])
def test_a_malformed_bundle_is_refused_before_anything_is_touched(bundle, edit, message):
    edit(bundle)
    model, tok = tiny_model_and_tokenizer("llama")
    before = _snapshot(model, tok)
    with pytest.raises(BundleError, match=message):
        SafeGateBundle.from_pretrained(bundle).check(model, tok)  # reading and checking already refuses it
    with pytest.raises(BundleError, match=message):
        load_bundle(model, tok, bundle)
    _assert_untouched(model, tok, before)


def test_the_unedited_bundle_loads(bundle):
    """Control for the cases above: the fixture bundle itself is valid and the snapshot sees an attach."""
    model, tok = tiny_model_and_tokenizer("llama")
    before = _snapshot(model, tok)
    gated = load_bundle(model, tok, bundle)
    assert _snapshot(model, tok)["modules"] != before["modules"]
    gated.detach()
    assert _snapshot(model, tok)["state"] == before["state"]


def test_a_load_that_fails_while_placing_weights_restores_model_and_tokenizer(bundle, monkeypatch):
    """Defence in depth: even a failure after the checks (inside PEFT) leaves the tokenizer as it was."""

    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure while placing the weights")

    monkeypatch.setattr("safegate.hub.bundle.set_peft_model_state_dict", broken)
    model, tok = tiny_model_and_tokenizer("llama")
    before = _snapshot(model, tok)
    with pytest.raises(RuntimeError, match="simulated failure"):
        load_bundle(model, tok, bundle)
    _assert_untouched(model, tok, before)


# ------------------------------------------------------------------------------------------------ item 9
def test_saving_over_a_bundle_replaces_only_the_bundles_files(tmp_path):
    first, tok = _trained(seed=1)
    second, _ = _trained(seed=2)
    target = first.save_bundle(tmp_path / "gate")
    extras = {
        "report.json": b'{"asr": 0.0}',
        "checkpoints/step-10/trainer_state.json": b"{}",
        "checkpoints/step-10/optimizer.bin": os.urandom(1000),
        "adapter/notes.txt": b"mine",
    }
    for name, data in extras.items():
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        (target / name).write_bytes(data)
    inode = (target / "checkpoints/step-10/optimizer.bin").stat().st_ino
    second.save_bundle(target)
    for name, data in extras.items():
        assert (target / name).read_bytes() == data, name
    assert (target / "checkpoints/step-10/optimizer.bin").stat().st_ino == inode  # linked, never copied
    reference = second.save_bundle(tmp_path / "reference")
    for name in BUNDLE_FILES:
        assert (target / name).read_bytes() == (reference / name).read_bytes(), name
    inputs = chat(tok, PROMPTS)
    loaded = load_bundle(*tiny_model_and_tokenizer("llama"), target)
    assert torch.equal(loaded.classify(**inputs), second.classify(**inputs))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gate", "reference"]  # no temporary folder left


def test_a_failed_save_over_a_bundle_keeps_the_old_bundle_and_the_other_files(tmp_path, monkeypatch):
    first, _ = _trained(seed=1)
    second, _ = _trained(seed=2)
    target = first.save_bundle(tmp_path / "gate")
    (target / "report.md").write_text("# report")
    before = {p: p.read_bytes() for p in target.rglob("*") if p.is_file()}

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safegate.hub.atomic.replace_dir", crash)
    with pytest.raises(OSError, match="disk full"):
        second.save_bundle(target)
    assert {p: p.read_bytes() for p in target.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gate"]
    monkeypatch.undo()
    second.save_bundle(target)  # and the next save still keeps it
    assert (target / "report.md").read_text() == "# report"


# -------------------------------------------------------------------------------------- item 14 (files)
def test_a_killed_save_leaves_no_temporary_folder_after_the_next_save(tmp_path):
    gated, _ = _trained(seed=1)
    target = gated.save_bundle(tmp_path / "gate")
    pid = os.fork()
    if pid == 0:  # the child is killed in the middle of a save, as by SIGKILL or a power cut
        try:
            import safegate.hub.bundle as bundle_module

            def die(*args, **kwargs):
                os.kill(os.getpid(), signal.SIGKILL)

            bundle_module.save_file = die
            gated.save_bundle(target)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert any(".tmp-" in p.name for p in tmp_path.iterdir()), "the kill did not interrupt a save"
    gated.save_bundle(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gate"]
    load_bundle(*tiny_model_and_tokenizer("llama"), target)


def test_bundle_files_get_the_umask_modes_and_the_target_keeps_its_mode(tmp_path):
    gated, _ = _trained()
    old = os.umask(0o022)
    try:
        target = gated.save_bundle(tmp_path / "gate")
        modes = {str(p.relative_to(target)): p.stat().st_mode & 0o777 for p in target.rglob("*")}
        assert modes == {n: 0o644 for n in BUNDLE_FILES} | {"adapter": 0o755}, modes
        assert target.stat().st_mode & 0o777 == 0o755
        target.chmod(0o750)  # a user's choice for the folder is kept by a re-save
        gated.save_bundle(target)
        assert target.stat().st_mode & 0o777 == 0o750
    finally:
        os.umask(old)


def _info(folder, capsys):
    code = main(["info", str(folder)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    "path",
    ["versions", "evaluation", "recipe", "method", "backbone.gated_module", "backbone.vocab_rows_gated",
     "backbone.dtype", "tokens.ids_at_save"],
)  # fmt: skip
def test_info_works_without_the_optional_fields(bundle, path, capsys):
    _config(path, _DELETE)(bundle)
    code, out, err = _info(bundle, capsys)
    assert code == 0, err
    assert "files (bytes):" in out
    load_bundle(*tiny_model_and_tokenizer("llama"), bundle)  # informational fields are not needed to load


MALFORMED_OPTIONAL = [
    ("versions", ["safegate 1"]),
    ("versions", "1.0"),
    ("evaluation", "asr 0"),
    ("evaluation", [1, 2]),
    ("recipe", {"name": 3}),
    ("method", 5),
    ("backbone.gated_module", 3),
    ("backbone.vocab_rows_gated", "517"),
    ("backbone.dtype", 16),
    ("tokens.ids_at_save", [1, 2]),
]


@pytest.mark.parametrize("path, value", MALFORMED_OPTIONAL, ids=[f"{p}={v!r}" for p, v in MALFORMED_OPTIONAL])
def test_info_names_a_malformed_optional_field_in_one_line(bundle, path, value, capsys):
    _config(path, value)(bundle)
    code, out, err = _info(bundle, capsys)  # an exception escaping here is the traceback the issue reports
    assert code == 2 and path.split(".")[-1] in err and "Traceback" not in err, err
    with pytest.raises(BundleError, match=path.split(".")[-1]):
        load_bundle(*tiny_model_and_tokenizer("llama"), bundle)
