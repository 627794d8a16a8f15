"""Metrics on hand-computed cases, result rows, and the PNG plots of `safegate.evaluation`."""

import pytest
from PIL import Image

from safegate.evaluation import metrics as M
from safegate.evaluation.attacks import Case
from safegate.evaluation.data import Record
from safegate.evaluation.plots import write_plots
from safegate.evaluation.report import fmt_rate, markdown, result_row, summary_table
from safegate.evaluation.runner import Outcome


def test_rate_excludes_judge_failures():
    assert M.rate([True, False, None, True]) == pytest.approx(2 / 3)
    assert M.rate([None, None]) is None and M.rate([]) is None


def test_auroc_hand_computed():
    # positives {0.35, 0.8}, negatives {0.1, 0.4}: pairs won 0.35>0.1, 0.8>0.1, 0.8>0.4 → 3 of 4
    assert M.auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    # a tie counts 1/2: positives {2, 3}, negatives {1, 2} → (1 + 0.5 + 1 + 1) / 4
    assert M.auroc([1, 2, 2, 3], [0, 1, 0, 1]) == pytest.approx(0.875)
    assert M.auroc([0.9, 0.8, 0.2], [1, 1, 0]) == 1.0 and M.auroc([0.1, 0.9], [1, 0]) == 0.0
    assert M.auroc([0.3, 0.4], [1, 1]) is None


def test_roc_curve_hand_computed():
    fpr, tpr = M.roc_curve([0.9, 0.8, 0.4, 0.1], [1, 0, 1, 0])
    assert fpr == [0.0, 0.0, 0.5, 0.5, 1.0] and tpr == [0.0, 0.5, 0.5, 1.0, 1.0]


def test_rate_ci_contains_the_estimate_is_seeded_and_narrows_with_n():
    flags = [True] * 30 + [False] * 70
    low, high = M.rate_ci(flags)
    assert low <= 0.3 <= high and 0.15 < low < 0.3 < high < 0.45
    assert M.rate_ci(flags, seed=0) == M.rate_ci(flags, seed=0)
    wide = M.rate_ci([True] * 3 + [False] * 7)
    assert wide[1] - wide[0] > high - low
    assert M.rate_ci([True, True, None]) == [1.0, 1.0] and M.rate_ci([None]) is None


def test_auroc_ci_contains_the_estimate():
    scores = [0.1, 0.4, 0.35, 0.8, 0.7, 0.2, 0.9, 0.05]
    labels = [0, 0, 1, 1, 1, 0, 1, 0]
    point = M.auroc(scores, labels)
    low, high = M.auroc_ci(scores, labels)
    assert 0.0 <= low <= point <= high <= 1.0
    assert M.auroc_ci([0.1, 0.2], [1, 1]) is None


def test_relative_reduction_hand_computed():
    assert M.relative_reduction(0.5, 0.1) == pytest.approx(0.8)
    assert M.relative_reduction(0.4, 0.0) == 1.0
    assert M.relative_reduction(0.2, 0.3) == pytest.approx(-0.5)  # the gate made it worse
    assert M.relative_reduction(0.0, 0.0) is None and M.relative_reduction(None, 0.1) is None
    base = [True] * 8 + [False] * 2
    gated = [True] + [False] * 9
    low, high = M.reduction_ci(base, gated)
    assert low <= M.relative_reduction(0.8, 0.1) <= high <= 1.0


def _case(label, attack="none"):
    return Case("d", attack, Record("request", label, 0), "request")


def test_result_row_counts_asr_over_refusal_and_gate_rates():
    cases = [_case("unsafe")] * 4 + [_case("safe")] * 3
    outcomes = [Outcome("b", "g", unsafe=u, score=s) for u, s in
                zip([True, True, True, False, False, False, True], [0.9, 0.8, 0.7, 0.2, 0.1, 0.3, 0.6])]  # fmt: skip
    base_refused = [False, False, False, True, False, False, False]
    gated_refused = [True, True, None, False, False, True, False]
    row = result_row("d", "none", cases, outcomes, base_refused, gated_refused, n_boot=200)
    assert (row["n"], row["n_harmful"], row["n_benign"]) == (7, 4, 3)
    assert row["base_asr"] == pytest.approx(3 / 4)  # harmful answers not refused by the base
    assert row["asr"] == pytest.approx(1 / 3)  # the judge failure is excluded: 1 compliant of 3 judged
    assert row["asr_relative_reduction"] == pytest.approx((3 / 4 - 1 / 3) / (3 / 4))
    assert row["base_refusal_rate"] == 0.0 and row["refusal_rate"] == pytest.approx(1 / 3)
    assert row["gate_unsafe_rate"] == pytest.approx(4 / 7)
    assert row["gate_unsafe_rate_harmful"] == 0.75 and row["gate_unsafe_rate_benign"] == pytest.approx(1 / 3)
    # harmful {0.9, 0.8, 0.7, 0.2} vs benign {0.1, 0.3, 0.6}: 3 + 3 + 3 + 1 = 10 of 12 pairs
    assert row["gate_auroc"] == pytest.approx(10 / 12)
    assert row["judge_failures"] == {"base": 0, "gated": 1}
    for key in ("asr", "base_asr", "refusal_rate", "base_refusal_rate", "gate_unsafe_rate"):
        low, high = row[f"{key}_ci"]
        assert low <= row[key] <= high


def _report(results):
    return {
        "model": "m", "bundle": None, "defense": {"name": "casa"}, "judge": {"name": "refusal", "kind": "keyword"},
        "date": "2026-01-01", "environment": {"device": "cpu"}, "settings": {"max_new_tokens": 8, "n_boot": 10,
        "seed": 0}, "results": results, "gate_auroc": 0.9, "gate_auroc_ci": [0.8, 1.0],
        "gate_auroc_n": {"harmful": 4, "benign": 3}, "skipped": [{"dataset": "d", "attack": "spoken", "reason": "x"}],
        "warnings": ["untrained"], "plots": ["roc.png"],
    }  # fmt: skip


def test_markdown_and_summary_show_base_to_gated_and_what_the_judge_measures():
    cases = [_case("unsafe")] * 2 + [_case("safe")] * 2
    outcomes = [Outcome("b", "g", True, 0.9)] * 4
    row = result_row("d", "none", cases, outcomes, [False, False, False, True], [True, False, True, True], n_boot=50)
    report = _report([row])
    text = markdown(report)
    assert "refusal (whether the answer declines the request), not harm" in text
    assert "| d | none | 2 | 100.0 % [100.0, 100.0] | 50.0 %" in text  # base ASR → gated ASR
    assert "+50.0 pp" in text and "## Skipped" in text and "untrained" in text
    table = summary_table(report)
    assert "100.0 % → 50.0 %" in table and "50.0 % → 100.0 %" in table and "gate AUROC: 0.900" in table
    assert fmt_rate(None) == "—"


def test_plots_are_valid_pngs(tmp_path):
    results = [
        {"dataset": "d", "attack": a, "n_harmful": 5, "asr": g, "asr_ci": [0.0, g + 0.1], "base_asr": b,
         "base_asr_ci": [b - 0.1, b + 0.1]}
        for a, b, g in (("none", 0.6, 0.0), ("prefill:2", 0.8, 0.2), ("template", 0.5, 0.1))
    ]  # fmt: skip
    written = write_plots(tmp_path, [0.9, 0.7, 0.4, 0.2, 0.1], [1, 1, 0, 1, 0], results)
    assert written == ["roc.png", "score_hist.png", "asr_by_attack.png"]
    for name in written:
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(tmp_path / name) as image:
            image.verify()
        with Image.open(tmp_path / name) as image:
            assert image.size[0] >= 400 and image.size[1] >= 300
    assert write_plots(tmp_path / ".", [], [], []) == []


def test_auroc_takes_tensors_of_any_shape():
    import torch

    scores = torch.tensor([[0.1, 0.4], [0.35, 0.8]], requires_grad=True)
    assert M.auroc(scores, torch.tensor([[0.0, 0.0], [1.0, 1.0]])) == pytest.approx(0.75)
    assert isinstance(M.auroc(torch.tensor([0.2, 0.9]), torch.tensor([0, 1])), float)
    assert M.auroc(torch.tensor([0.2, 0.9]), torch.tensor([1, 1])) is None  # one class: no AUROC
    with pytest.raises(ValueError, match="one score per label"):
        M.auroc([0.1, 0.2, 0.3], [0, 1])
