"""Issue 17 items 8 and 14: every output path checked before training; non-UTF-8 and single-label data."""

import pathlib

import pytest

import safegate
import safegate.training.recipes as recipes
from safegate.cli import main
from safegate.testing import tiny_model_and_tokenizer
from safegate.training.gate_fit import cache_prompts, fit_gate
from safegate.training.recipe_run import recipe_records
from safegate.training.recipes import parse_recipe
from tests.conftest import SMALL

RECIPE = pathlib.Path(__file__).resolve().parents[2] / "recipes" / "tiny_cpu.yaml"
RECORDS = [
    {"prompt": "How do I bake bread?", "response": "Mix flour and water.", "label": "safe"},
    {"prompt": "Build a bomb.", "response": "I cannot help with that.", "label": "unsafe"},
]
UNSAFE_ONLY = [
    {"prompt": f"Build weapon number {i}.", "response": "I cannot help with that.", "label": "unsafe"}
    for i in range(4)
]
QUICK = dict(max_steps=1, logging_steps=1, disable_tqdm=True, save_strategy="no", report_to=[])


def gated_model():
    model, tok = tiny_model_and_tokenizer("qwen2")
    return safegate.attach(model, tok, safegate.GateConfig(**SMALL))


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the output paths were checked")

    monkeypatch.setattr(recipes, "load_recipe_model", refuse)


def train_cli(*sets, dry_run=False):
    argv = ["train", str(RECIPE), "--set", "training.max_steps=1", "--set", "training.disable_tqdm=true"]
    for item in sets:
        argv += ["--set", item]
    return main(argv + (["--dry-run"] if dry_run else []))


# ------------------------------------------------------------------------------------------- item 8
@pytest.mark.parametrize("dry_run", [False, True])
def test_non_bundle_folder_as_bundle_target_fails_before_training(tmp_path, no_model_load, capsys, dry_run):
    target = tmp_path / "results"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    code = train_cli(f"training.output_dir={tmp_path / 'run'}", f"output.bundle={target}", dry_run=dry_run)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "output.bundle" in err and str(target) in err and "new or empty folder" in err
    assert [p.name for p in target.iterdir()] == ["notes.txt"] and not (tmp_path / "run").exists()


def test_every_output_path_is_checked_before_the_model_loads(tmp_path, no_model_load, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    run = tmp_path / "run"
    cases = [
        ((f"training.output_dir={a_file}", f"output.bundle={tmp_path / 'b'}"), ["training.output_dir", "is a file"]),
        ((f"training.output_dir={run}", f"output.bundle={a_file}"), ["output.bundle", "is a file"]),
        ((f"training.output_dir={run}", f"output.bundle={a_file}/bundle"), ["output.bundle", "cannot create"]),
        ((f"training.output_dir={a_file}/run", f"output.bundle={run}/b"), ["training.output_dir", "cannot create"]),
        ((f"training.output_dir={run}", f"output.bundle={run}"), ["output.bundle", f"output.bundle={run}/bundle"]),
        ((f"training.output_dir={run}/ckpt", f"output.bundle={run}"), ["output.bundle", "checkpoints"]),
    ]
    for sets, needles in cases:
        assert train_cli(*sets) == 2, sets
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and all(n in err for n in needles), (sets, err)
    assert a_file.read_text() == "x" and not run.exists()


def test_library_train_checks_its_output_dir_before_training(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    gated = gated_model()
    with pytest.raises(ValueError, match="args.output_dir .* is a file"):
        safegate.train(gated, RECORDS, args=dict(QUICK, output_dir=str(a_file), save_strategy="steps"))
    assert a_file.read_text() == "x"


# ------------------------------------------------------------------------------------------- item 14: UTF-8
@pytest.fixture
def latin1_file(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(
        b'{"prompt": "Hi", "response": "Hello.", "label": "safe"}\n'
        b'{"prompt": "Caf\xe9?", "response": "No.", "label": "unsafe"}\n'
    )
    return path


def test_non_utf8_training_data_is_one_value_error_naming_file_and_line(latin1_file, tmp_path, capsys):
    gated = gated_model()
    where = f"{latin1_file}:2"
    for call in (
        lambda: safegate.train(gated, latin1_file, args=dict(QUICK, output_dir=str(tmp_path / "o"))),
        lambda: safegate.train(gated, RECORDS, latin1_file, args=dict(QUICK, output_dir=str(tmp_path / "o"))),
        lambda: fit_gate(gated, latin1_file, epochs=1),
        lambda: fit_gate(gated, RECORDS, epochs=1, eval_data=latin1_file),
        lambda: cache_prompts(gated, latin1_file),
        lambda: recipe_records(parse_recipe({"model": {"name": "tiny:qwen2"}, "data": {"train": [str(latin1_file)]}})),
        lambda: recipe_records(
            parse_recipe(
                {
                    "model": {"name": "tiny:qwen2"},
                    "data": {"harmful": [str(latin1_file)], "benign": [str(latin1_file)]},
                }
            )
        ),  # fmt: skip
    ):
        with pytest.raises(ValueError) as info:
            call()
        assert where in str(info.value) and "UTF-8" in str(info.value) and "\n" not in str(info.value)
    outputs = [f"training.output_dir={tmp_path / 'run'}", f"output.bundle={tmp_path / 'b'}"]
    code = train_cli(f"data.train=[{latin1_file}]", "data.eval_size=0", *outputs)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and where in err and "UTF-8" in err


def test_non_utf8_recipe_names_the_line(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(b"model:\n  name: 'tiny:qwen2'  # caf\xe9\n")
    assert main(["train", str(recipe), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "line 2" in err and "UTF-8" in err


# ------------------------------------------------------------------------------------------- item 14: labels
def test_single_label_training_warns_with_the_counts(tmp_path):
    gated = gated_model()
    with pytest.warns(UserWarning, match=r"0 'safe' and 4 'unsafe' gate records.*Add 'safe' records"):
        safegate.train(gated, UNSAFE_ONLY, args=dict(QUICK, output_dir=str(tmp_path)))


def test_fit_gate_names_single_label_data_before_caching(monkeypatch):
    gated = gated_model()
    safe_only = [dict(r, label="safe") for r in UNSAFE_ONLY] + [dict(RECORDS[1], gate=False)]  # gate: false uncounted
    cache = cache_prompts(gated, UNSAFE_ONLY)
    import safegate.training.gate_fit as gate_fit

    real = gate_fit.cache_prompts
    seen = []

    def spy(*args, **kwargs):
        seen.append(len(warned))
        return real(*args, **kwargs)

    monkeypatch.setattr(gate_fit, "cache_prompts", spy)
    with pytest.warns(
        UserWarning, match=r"fit_gate data lacks a label: 4 'safe' and 0 'unsafe'.*Add 'unsafe'"
    ) as warned:
        stats = fit_gate(gated, safe_only, epochs=1)
    assert seen == [1] and "train_auroc" not in stats  # warned before caching; AUROC undefined, not reported
    with pytest.warns(UserWarning, match=r"0 'safe' and 4 'unsafe'"):
        fit_gate(gated, cache, epochs=1)
