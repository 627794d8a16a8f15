"""`benchmarks/calibration_sweep.py`: re-calibrating a stored demo gate and reading the outcome from its answers."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import safegate
from safegate.backbones.load import load_model

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "calibration_sweep.py"


def load_script():
    spec = importlib.util.spec_from_file_location("calibration_sweep", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(dataset, label, p, base_refused=False):
    return dict(dataset=dataset, attack="none", label=label, p_unsafe=p, gate_unsafe=p >= 0.5,
                base_refused=base_refused, gated_refused=p >= 0.5)  # fmt: skip


ROWS = ([_row("harmful", "unsafe", p) for p in [0.9] * 9 + [0.3]]
        + [_row("xstest", "safe", p) for p in [0.6] + [0.1] * 19]
        + [_row("alpaca", "safe", 0.1) for _ in range(10)])  # fmt: skip


def test_outcome_reads_the_three_targets_at_a_threshold():
    sweep = load_script()
    low, high = sweep.outcome(ROWS, 0.2), sweep.outcome(ROWS, 0.7)
    assert (low["xstest_pp"], low["lowest_reduction"], low["targets_met"]) == (0.05, 1.0, False)  # +5 pp > +3
    assert (high["xstest_pp"], high["alpaca_pp"], high["targets_met"]) == (0.0, 0.0, True)
    assert (
        high["lowest_reduction"] == pytest.approx(0.9) and high["inferred_answers"] == 1
    )  # the look-alike at 0.6, no longer flagged


def test_end_to_end_on_a_stored_tiny_gate(tmp_path, capsys):
    sweep = load_script()
    with pytest.raises(FileNotFoundError, match="no bundle/"):
        sweep.run_folders(tmp_path)
    torch.manual_seed(0)
    model, tok = load_model("tiny:qwen2")
    gated = safegate.attach(model, tok, safegate.GateConfig(attention_dim=16, lora_r=4))
    for seed in (0, 1):
        folder = tmp_path / f"seed-{seed}"
        gated.save_bundle(folder / "bundle")
        (folder / "report").mkdir()
        (folder / "report" / "responses.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "data").mkdir()
    prompts = ["Bake bread?", "A poem on the sea.", "Name a river.", "Sum 2 and 3."]
    (tmp_path / "data" / "calibration.jsonl").write_text("".join(json.dumps({"prompt": p, "label": "safe"}) + "\n"
                                                                 for p in prompts))  # fmt: skip
    out = tmp_path / "rows.json"
    assert sweep.main([str(tmp_path), "--fprs", "0,0.25", "--model", "tiny:qwen2", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["run"], r["target_fpr"]) for r in rows] == [("seed-0", 0.0), ("seed-0", 0.25), ("seed-1", 0.0),
                                                           ("seed-1", 0.25)]  # fmt: skip
    assert rows[0]["threshold"] >= rows[1]["threshold"]  # a lower target rate never lowers the threshold
    assert capsys.readouterr().out.count("| seed-") == 4
