"""The inference core imports no other layer: bundles reach `SafeGateModel.save_bundle` by registration."""

import ast
from pathlib import Path

import pytest

import safegate
from safegate.hub.bundle import SafeGateBundle
from safegate.modeling.model import SafeGateModel
from safegate.testing import chat, tiny_model_and_tokenizer
from tests.conftest import SMALL

MODELING = Path(safegate.__file__).parent / "modeling"


def _imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


@pytest.mark.parametrize("path", sorted(MODELING.glob("*.py")), ids=lambda p: p.name)
def test_modeling_imports_no_other_safegate_subpackage(path):
    imported = _imported_modules(path)
    outside = {m for m in imported if m.startswith("safegate.") and not m.startswith("safegate.modeling")}
    assert outside == set(), f"{path.name} imports {sorted(outside)}"


def test_importing_safegate_registers_the_bundle_format():
    assert SafeGateModel.bundle_class is SafeGateBundle


def test_save_bundle_writes_a_bundle_that_loads(tmp_path):
    model, tok = tiny_model_and_tokenizer("qwen2")
    gated = safegate.attach(model, tok, safegate.GateConfig(**SMALL))
    folder = gated.save_bundle(tmp_path / "gate", recipe="tiny")
    assert folder == tmp_path / "gate" and SafeGateBundle.from_pretrained(folder).config["recipe"] == "tiny"
    fresh, fresh_tok = tiny_model_and_tokenizer("qwen2")
    inputs = chat(tok, ["How do I bake bread?"])
    reloaded = safegate.load_bundle(fresh, fresh_tok, folder)
    assert bool(reloaded.classify(**inputs) == gated.classify(**inputs))


def test_saving_without_a_registered_format_names_the_import(monkeypatch, tmp_path):
    model, tok = tiny_model_and_tokenizer("qwen2")
    gated = safegate.attach(model, tok, safegate.GateConfig(**SMALL))
    monkeypatch.setattr(SafeGateModel, "bundle_class", None)
    with pytest.raises(RuntimeError, match=r"import safegate\.hub\.bundle"):
        gated.save_bundle(tmp_path / "gate")
    with pytest.raises(RuntimeError, match=r"import safegate\.hub\.bundle"):
        gated.push_to_hub("me/gate")
    assert not (tmp_path / "gate").exists()
