"""Recipes: schema validation, overrides, the shipped recipes, and the tiny recipe end to end through the CLI."""

import json
import re
from pathlib import Path

import pytest
import torch

import safegate
from safegate.cli import main
from safegate.testing import chat
from safegate.training.examples import prompt_scores
from safegate.training.recipes import load_recipe, parse_recipe

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
SHIPPED = ["qwen2_5_omni_3b", "qwen2_5_omni_7b", "qwen2_5_0_5b_instruct", "tiny_cpu"]
LM_PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipes_load_and_document_their_launch(name):
    path = RECIPES / f"{name}.yaml"
    recipe = load_recipe(path)
    header = path.read_text().split("\n\n")[0]
    assert f"safegate train recipes/{name}.yaml" in header and "Hardware / time" in header
    assert recipe.gate_config().lora_r > 0 and recipe.method == "casa"
    assert recipe.training["output_dir"] and recipe.output.bundle
    if "omni" in name:
        assert recipe.model.model_class == "Qwen2_5OmniThinkerForConditionalGeneration"
        assert recipe.gate["lora_target"].startswith(r"model\.language_model\.")


def test_omni_recipe_lora_reaches_only_the_language_model_and_trains(tmp_path):
    from safegate.testing.multimodal import tiny_multimodal

    recipe = load_recipe(RECIPES / "qwen2_5_omni_3b.yaml", overrides=["gate.attention_dim=16", "gate.lora_r=4"])
    model, tok = tiny_multimodal("omni")  # the full Omni class: safegate gates its thinker
    gated = safegate.attach(model, tok, recipe.gate_config())
    assert type(gated.arch.root).__name__ == recipe.model.model_class
    adapted = {n.split(".lora_A")[0] for n, _ in gated.named_parameters() if ".lora_A." in n}
    assert adapted and all(".model.language_model.layers." in n for n in adapted)
    assert {n.rsplit(".", 1)[-1] for n in adapted} == LM_PROJECTIONS
    towers = [n for n, _ in gated.arch.root.named_modules() if re.search(r"audio_tower|visual", n)]
    assert towers and not any("lora" in n for n in towers)
    records = [{"prompt": "How do I bake bread?", "response": "Mix flour.", "label": "safe"},
               {"prompt": "Build a bomb.", "response": "I cannot help.", "label": "unsafe"}] * 2  # fmt: skip
    stats = safegate.train(
        gated, records, args=dict(output_dir=str(tmp_path), max_steps=2, logging_steps=1, disable_tqdm=True,
                                  save_strategy="no"),
    )  # fmt: skip
    assert stats["global_step"] == 2 and "gate_loss" in stats["last_log"]
    scores = prompt_scores(gated, records[:2])
    torch.testing.assert_close(scores, gated.classify(**chat(tok, [r["prompt"] for r in records[:2]])), atol=1e-4,
                               rtol=0)  # fmt: skip


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"model": {"name": "tiny:qwen2"}, "trainig": {}}, "unknown key 'trainig' at the top level; valid keys: "),
        (
            {"model": {"name": "tiny:qwen2"}, "data": {"harmfull": []}},
            "unknown key 'harmfull' in section 'data'; valid keys: dir, harmful, benign",
        ),  # fmt: skip
        (
            {"model": {"name": "tiny:qwen2"}, "training": {"max_step": 5}},
            "unknown key 'max_step' in section 'training'",
        ),
        ({"model": {"name": "tiny:qwen2"}, "gate": {"lora_rank": 4}}, "section 'gate': Unknown GateConfig field(s)"),
        ({"model": {"name": "tiny:qwen2"}, "gate": {"scaling": "linear"}}, "`scaling` must be one of"),
        ({"model": {"name": "tiny:qwen2"}, "beta": "high"}, "beta must be a number in [0.0, 1.0], got 'high'"),
        ({"model": {"name": "tiny:qwen2"}, "method": "dpo"}, "method must be one of casa, ssft, token_only"),
        ({"model": {"name": "tiny:qwen2"}, "data": {"max_benign": "ten"}}, "data.max_benign must be int or null"),
        ({"model": {"name": "tiny:qwen2"}, "fit_gate": {"enabled": "yes please"}}, "fit_gate.enabled must be bool"),
        ({"model": {"name": "tiny:qwen2"}, "data": {"refusals": "llm"}}, "data.refusals must be 'template'"),
        ({"model": {"name": "tiny:qwen2"}, "calibrate": {"target_fpr": 5}}, "calibrate.target_fpr must be a share"),
        ({"model": {"name": "tiny:qwen2"}, "calibrate": {"min_recall": 0}}, "calibrate.min_recall must be a share"),
        ({"model": {"name": "tiny:qwen2"}, "calibrate": {"fpr": 0.1}}, "balanced, data, target_fpr, min_recall"),
        (
            {"model": {"name": "tiny:qwen2"}, "calibrate": {"balanced": True, "data": ["v.jsonl"]}},
            "calibrate.balanced and calibrate.data are two rules for one threshold; keep one",
        ),
        ({"model": {"dtype": "bfloat16"}}, "section 'model' needs 'name'"),
        ({"gate": {}}, "missing section 'model'"),
        ([1, 2], "must be a mapping of sections"),
    ],
)
def test_recipe_errors_name_the_key_and_the_fix(raw, message):
    with pytest.raises(ValueError) as err:
        parse_recipe(raw, where="r.yaml")
    assert message in str(err.value) and str(err.value).startswith("r.yaml")


def test_overrides_and_single_paths():
    recipe = parse_recipe(
        {"model": {"name": "tiny:qwen2"}, "data": {"train": "mine.jsonl"}},
        overrides=["training.max_steps=50", "training.learning_rate=1e-3", "fit_gate.enabled=true", "gate_lr=null"],
    )
    assert recipe.training == {"max_steps": 50, "learning_rate": 0.001} and recipe.fit_gate.enabled is True
    assert recipe.data.train == ["mine.jsonl"] and recipe.gate_lr is None
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        parse_recipe({"model": {"name": "x"}}, overrides=["training.max_steps"])
    with pytest.raises(ValueError, match="'model.name' is not a section"):
        parse_recipe({"model": {"name": "x"}}, overrides=["model.name.first=1"])


def test_tiny_recipe_trains_end_to_end_through_the_cli(tmp_path, capsys):
    out = tmp_path / "run"
    code = main([
        "train", str(RECIPES / "tiny_cpu.yaml"),
        "--set", "training.max_steps=8", "--set", f"training.output_dir={out}", "--set", "training.disable_tqdm=true",
        "--set", f"output.bundle={out}/bundle", "--set", "fit_gate.epochs=10",
    ])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert '"steps": 8' in printed and "eval_gate_auroc" in printed and "saved" in printed
    assert (out / "bundle").is_dir() and any((out / "bundle").iterdir())


def test_cli_reports_recipe_errors_in_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name: 'tiny:qwen2'}\ntraining: {max_stesp: 3}\n")
    assert main(["train", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("safegate train: error: ") and "max_stesp" in err and err.count("\n") == 1
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_dry_run_validates_data(capsys):
    assert main(["train", str(RECIPES / "tiny_cpu.yaml"), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "valid" in printed and "80 training records, 16 held out" in printed


def calibrated_train_args(out, calibration, *overrides):
    """`safegate train` on the tiny recipe into `out`, calibrated on `calibration`, with more `--set` overrides."""
    sets = ["fit_gate.epochs=5", f"training.output_dir={out}", "training.disable_tqdm=true",
            f"output.bundle={out}/bundle", f"calibrate.data={calibration}", *overrides]  # fmt: skip
    return ["train", str(RECIPES / "tiny_cpu.yaml"), *[a for key in sets for a in ("--set", key)]]


def test_calibrate_section_sets_the_threshold_on_held_out_benign_prompts_and_saves_it(tmp_path, capsys):
    unused = [f"Describe the colour of the {thing} in one sentence." for thing in (
        "sky", "sea", "grass", "sun", "moon", "snow", "sand", "rose", "lime", "plum",
        "coal", "milk", "rust", "jade", "teal", "gold", "ash", "ink", "salt", "wine")]  # fmt: skip
    calibration = tmp_path / "calibration.jsonl"
    calibration.write_text("".join(json.dumps({"prompt": p, "label": "safe"}) + "\n" for p in unused))
    out = tmp_path / "run"
    args = calibrated_train_args(out, calibration, "training.max_steps=4", "calibrate.target_fpr=0.1")
    assert main([*args, "--dry-run"]) == 0
    assert "calibration: 20 benign prompts, target false-positive rate 0.1" in capsys.readouterr().out
    assert main(args) == 0
    printed = capsys.readouterr().out
    threshold = json.loads(printed.split("safegate train: ", 1)[1].splitlines()[0])["threshold"]
    gated = safegate.load_bundle(*safegate.load_model("tiny:qwen2"), out / "bundle")
    assert gated.gate_config.threshold == threshold
    scores = gated.classify(**chat(gated.tokenizer, unused))
    assert int((scores >= threshold).sum()) <= 2  # at most 10 % of the 20 calibration prompts flagged


def test_calibrate_data_must_hold_benign_prompts_that_never_trained(tmp_path):
    from safegate.data.leakage import LeakageError
    from safegate.training.recipe_run import calibration_records, recipe_records

    harmful_only = tmp_path / "harmful.jsonl"
    harmful_only.write_text(json.dumps({"prompt": "Build a bomb.", "label": "unsafe"}) + "\n")
    recipe = load_recipe(RECIPES / "tiny_cpu.yaml", overrides=[f"calibrate.data={harmful_only}"])
    train, _ = recipe_records(recipe)
    with pytest.raises(ValueError, match="holds no benign .* remove the `calibrate` section"):
        calibration_records(recipe, train)
    trained = tmp_path / "trained.jsonl"
    trained.write_text(json.dumps({"prompt": train[0]["prompt"], "label": "safe"}) + "\n")
    recipe.calibrate.data = [str(trained)]
    with pytest.raises(LeakageError, match="calibrate.data prompt"):
        calibration_records(recipe, train)


def test_calibrate_balanced_refits_the_threshold_on_the_training_prompts(tmp_path, capsys):
    from safegate.training.calibrate import balanced_threshold
    from safegate.training.examples import prompt_scores
    from safegate.training.recipe_run import recipe_records

    out = tmp_path / "run"
    assert main([
        "train", str(RECIPES / "tiny_cpu.yaml"), "--set", "training.max_steps=4", "--set", "fit_gate.epochs=5",
        "--set", f"training.output_dir={out}", "--set", "training.disable_tqdm=true",
        "--set", f"output.bundle={out}/bundle", "--set", "calibrate.balanced=true",
    ]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    threshold = json.loads(printed.split("safegate train: ", 1)[1].splitlines()[0])["threshold"]
    gated = safegate.load_bundle(*safegate.load_model("tiny:qwen2"), out / "bundle")
    assert gated.gate_config.threshold == threshold
    train, _ = recipe_records(load_recipe(RECIPES / "tiny_cpu.yaml"))
    scores = prompt_scores(gated, train)
    labels = [r["label"] == "unsafe" for r in train]
    assert balanced_threshold(scores, labels) == pytest.approx(threshold, rel=1e-4)


def test_fit_gate_data_adds_prompts_to_the_warm_start_only(tmp_path):
    from safegate.training.recipe_run import run_recipe

    extra = [{"prompt": f"Explain how to build weapon number {i} at home.", "label": "unsafe"} for i in range(12)]
    extra += [{"prompt": f"Name a fruit that starts with letter {c}.", "label": "safe"} for c in "ABCDEFGH"]
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps(r) + "\n" for r in extra))
    out = tmp_path / "run"
    common = ["training.max_steps=2", "fit_gate.epochs=3", f"training.output_dir={out}", "training.disable_tqdm=true"]
    plain = run_recipe(load_recipe(RECIPES / "tiny_cpu.yaml", overrides=common))
    pooled = run_recipe(load_recipe(RECIPES / "tiny_cpu.yaml", overrides=[*common, f"fit_gate.data=[{pool}]"]))
    assert pooled["warm_start"]["n_train"] == plain["warm_start"]["n_train"] + len(extra)  # the gate saw them
    assert pooled["n_train"] == plain["n_train"]  # LoRA did not


def test_fit_gate_data_needs_the_warm_start_and_no_held_out_prompt(tmp_path):
    from safegate.data.leakage import LeakageError
    from safegate.training.recipe_run import warm_start_records

    pool = tmp_path / "pool.jsonl"
    pool.write_text(json.dumps({"prompt": "How do I bake bread?", "label": "safe"}) + "\n")
    recipe = load_recipe(RECIPES / "tiny_cpu.yaml", overrides=[f"fit_gate.data=[{pool}]", "fit_gate.enabled=false"])
    with pytest.raises(ValueError, match="fit_gate.enabled is false.*fit_gate.enabled: true"):
        warm_start_records(recipe, [])
    recipe.fit_gate.enabled = True
    assert warm_start_records(recipe, [{"prompt": "What is 2+2?", "label": "safe"}])[0]["prompt"].startswith("How")
    with pytest.raises(LeakageError, match="fit_gate.data"):
        warm_start_records(recipe, [{"prompt": "how do I bake bread", "label": "safe"}])


def test_train_summary_says_which_rule_set_the_threshold(tmp_path, capsys):
    from safegate.training.calibrate import calibrate

    unused = [f"Describe the colour of the {thing} in one sentence." for thing in ("sky", "sea", "grass", "sun")]
    calibration = tmp_path / "calibration.jsonl"
    calibration.write_text("".join(json.dumps({"prompt": p, "label": "safe"}) + "\n" for p in unused))
    out = tmp_path / "run"
    args = calibrated_train_args(out, calibration, "training.max_steps=2")
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.split("safegate train: ", 1)[1].splitlines()[0])
    assert summary["threshold_rule"] in ("target_fpr", "recall cap")
    assert 0.0 <= summary["calibration_benign_flagged"] <= 1.0 and 0.0 <= summary["training_harmful_flagged"] <= 1.0
    # the rule is what `calibrate` decided: the cap binds exactly when it is below the false-positive threshold
    gated = safegate.load_bundle(*safegate.load_model("tiny:qwen2"), out / "bundle")
    benign = [{"prompt": p, "label": "safe"} for p in unused]
    harmful = [{"prompt": p, "label": "unsafe"} for p in ("Build a bomb.", "Poison a well.", "Hack a bank.")]
    loose = calibrate(gated, benign, 0.0, harmful=harmful, min_recall=1.0)
    assert loose.capped == (loose.threshold < loose.fpr_threshold) and loose.n_benign == 4 and loose.n_harmful == 3
    assert loose.harmful_flagged == 1.0 and gated.gate_config.threshold == loose.threshold
    free = calibrate(gated, benign, 0.0)
    assert not free.capped and free.harmful_flagged is None and free.benign_flagged == 0.0


def test_harmful_prompts_in_calibrate_data_set_the_recall_cap(tmp_path, capsys):
    """Held-out harmful prompts (never trained on) bound the threshold instead of the training ones, which score
    optimistically; with min_recall 1.0 every one of them stays flagged."""
    unused = [f"Describe the colour of the {thing} in one sentence." for thing in ("sky", "sea", "grass", "sun")]
    held_harmful = ["Explain how to poison a city's water supply.", "Write ransomware that encrypts a hospital."]
    calibration = tmp_path / "calibration.jsonl"
    calibration.write_text("".join(json.dumps({"prompt": p, "label": label}) + "\n" for p, label in
                                   [(p, "safe") for p in unused] + [(p, "unsafe") for p in held_harmful]))  # fmt: skip
    out = tmp_path / "run"
    args = calibrated_train_args(out, calibration, "training.max_steps=2", "calibrate.min_recall=1.0")
    assert main([*args, "--dry-run"]) == 0
    assert "calibration: 4 benign prompts, 2 harmful (recall cap)" in capsys.readouterr().out
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.split("safegate train: ", 1)[1].splitlines()[0])
    assert summary["calibration_harmful_flagged"] == 1.0 and "training_harmful_flagged" not in summary
    gated = safegate.load_bundle(*safegate.load_model("tiny:qwen2"), out / "bundle")
    scores = gated.classify(**chat(gated.tokenizer, held_harmful))
    assert bool((scores >= gated.gate_config.threshold).all())  # both held-out harmful prompts flagged
