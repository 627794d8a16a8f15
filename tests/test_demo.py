"""`safegate demo`: the quick tour runs, and the closing summary checks targets honestly."""

from safegate.cli import main
from safegate.demo import summary


def test_quick_demo_runs(capsys):
    assert main(["demo", "--quick"]) == 0
    out = capsys.readouterr().out
    assert out.count("p=") == 4 and "safe" in out


def _row(dataset, attack, n_harmful, n_benign, **values):
    row = dict(
        dataset=dataset,
        attack=attack,
        n=n_harmful + n_benign,
        n_harmful=n_harmful,
        n_benign=n_benign,
        asr=None,
        base_asr=None,
        asr_relative_reduction=None,
        refusal_rate=None,
        base_refusal_rate=None,
    )
    row.update(values)
    return row


def test_summary_reports_met_and_missed_targets():
    report = {
        "model": "m", "judge": {"name": "refusal"}, "gate_auroc": 0.97,
        "results": [
            _row("harmful", "none", 10, 0, asr=0.0, base_asr=0.8, asr_relative_reduction=1.0),
            _row("harmful", "template", 10, 0, asr=0.4, base_asr=0.8, asr_relative_reduction=0.5),
            _row("xstest", "none", 0, 20, refusal_rate=0.15, base_refusal_rate=0.05),
        ],
    }  # fmt: skip
    text = summary(report, 60.0)
    assert "[met] ASR reduction harmful/none: 100%" in text
    assert "[MISSED] ASR reduction harmful/template: 50%" in text
    assert "[MISSED] over-refusal on held-out XSTest-safe: +10.0 pp" in text
    assert "[met] gate AUROC, held-out: 0.970" in text
