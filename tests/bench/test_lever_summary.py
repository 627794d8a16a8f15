"""`benchmarks/lever_summary.py`: every lever's left-out AUROC read from stored results files, beside the target."""

import json
import statistics

import pytest

from tests.conftest import load_benchmark


def load_script():
    return load_benchmark("lever_summary")


def _protocol(path, aurocs):
    """A `generalization.py` results file: `aurocs[source]` = one AUROC per seed (vs B = AUROC - 0.1)."""
    folds = [{"seed": seed, "left_out": source, "auroc": a, "auroc_vs_xstest_safe_b": a - 0.1}
             for source, values in aurocs.items() for seed, a in enumerate(values)]  # fmt: skip
    path.write_text(json.dumps({"folds": folds, "meta": {"machine": {"commit": "abcdef0123"}}}))
    return path


def _probe(path, per_layer):
    """A `layer_probe.py` results file: `per_layer` = [(loso AUROC, in-source AUROC) of xstest_unsafe per layer]."""

    def both(a):
        return {"auroc": a, "auroc_vs_xstest_safe_b": a}

    layers = [{"layer": i, "sources": {"xstest_unsafe": {"loso": both(loso), "in_source": both(ins)}}}
              for i, (loso, ins) in enumerate(per_layer)]  # fmt: skip
    path.write_text(json.dumps({"layers": {"last": layers, "mean": []}, "mlp": {}, "meta": {}}))
    return path


def test_a_lever_row_is_the_mean_and_spread_over_its_seeds(tmp_path):
    script = load_script()
    path = _protocol(tmp_path / "r.json", {"advbench": [0.96, 0.98], "xstest_unsafe": [0.80, 0.70, 0.75]})
    row = script.read_run("lever", path)
    assert row["commit"] == "abcdef0" and not row["control"]
    xs = row["sources"]["xstest_unsafe"]["auroc"]
    assert xs["mean"] == pytest.approx(0.75) and xs["std"] == pytest.approx(statistics.stdev([0.8, 0.7, 0.75]))
    assert row["sources"]["advbench"]["auroc_vs_xstest_safe_b"]["mean"] == pytest.approx(0.87)
    assert "harmbench" not in row["sources"]  # a source the run did not leave out stays empty, never zero


def test_a_probe_contributes_its_best_layer_of_the_right_fold(tmp_path):
    script = load_script()
    path = _probe(tmp_path / "p.json", [(0.5, 0.6), (0.81, 0.7), (0.7, 0.93)])
    assert script.read_run("probe", path)["sources"]["xstest_unsafe"]["auroc"]["mean"] == 0.81  # left out
    mlp = {
        "seeds": [
            {"sources": {"xstest_unsafe": {"loso": {"auroc": a, "auroc_vs_xstest_safe_b": a}}}} for a in (0.8, 0.9)
        ]
    }
    results = {**json.loads(path.read_text()), "mlp": {"layer 1": mlp}}
    (tmp_path / "m.json").write_text(json.dumps(results))
    best = script.read_run("mlp", f"{tmp_path / 'm.json'}#mlp")["sources"]["xstest_unsafe"]["auroc"]
    assert best["mean"] == pytest.approx(0.85) and best["std"] == pytest.approx(statistics.stdev([0.8, 0.9]))
    control = script.read_run("probe", path, control=True)["sources"]["xstest_unsafe"]["auroc"]
    assert control == {"mean": 0.93, "std": None, "n": 1}  # half trained on: the in-source fold


def test_main_writes_the_table_and_json_and_says_which_levers_reach_the_target(tmp_path, capsys):
    script = load_script()
    good = _protocol(tmp_path / "good.json", {s: [0.97, 0.99] for s in script.SOURCES})
    bad = _protocol(tmp_path / "bad.json", {"advbench": [0.99], "xstest_unsafe": [0.6]})
    probe = _probe(tmp_path / "p.json", [(0.5, 0.96)])
    out = tmp_path / "out"
    assert script.main(["--run", f"good={good}", "--run", f"bad={bad}", "--control", f"ceiling={probe}",
                        "--out", str(out), "--no-plot"]) == 0  # fmt: skip
    text = (out / "levers.md").read_text()
    assert "| bad | **0.990** | — | — | 0.600 | 0.500 | abcdef0 |" in text
    assert "| ceiling | — | — | — | **0.960** | **0.960** | — |" in text
    assert "Levers that reach it on all four: good." in text  # a control never counts as a lever
    assert [r["label"] for r in json.loads((out / "levers.json").read_text())["rows"]] == ["good", "bad", "ceiling"]
    assert "good" in capsys.readouterr().out


def test_the_figure_has_a_row_per_run(tmp_path):
    pytest.importorskip("matplotlib")
    script = load_script()
    path = _protocol(tmp_path / "r.json", {"xstest_unsafe": [0.8, 0.7]})
    assert script.main(["--run", f"a={path}", "--run", f"b={path}", "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "levers.png").stat().st_size > 10_000


def test_bad_inputs_name_the_argument_and_the_fix(tmp_path, capsys):
    script = load_script()
    with pytest.raises(FileNotFoundError, match="'missing': no results file at .*nowhere.json"):
        script.read_run("missing", tmp_path / "nowhere.json")
    (tmp_path / "other.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="neither a generalization.py nor a layer_probe.py"):
        script.read_run("other", tmp_path / "other.json")
    empty = _protocol(tmp_path / "e.json", {})
    with pytest.raises(ValueError, match="no fold of advbench"):
        script.read_run("empty", empty)
    inside = tmp_path / "in.json"
    inside.write_text(json.dumps({**json.loads(empty.read_text()), "folds": [{"left_out": "advbench", "auroc": 0.99,
                                  "auroc_vs_xstest_safe_b": 0.9}], "in_source": 0.5}))  # fmt: skip
    with pytest.raises(ValueError, match="in_source=0.5.*pass it with --control"):
        script.read_run("half trained", inside)
    assert script.read_run("half trained", inside, control=True)["control"]
    with pytest.raises(SystemExit):
        script.main(["--run", "no-equals-sign", "--out", str(tmp_path)])
    assert "expected LABEL=PATH, got 'no-equals-sign'" in capsys.readouterr().err


def test_every_documented_run_is_still_readable():
    """The default manifest names files under docs/generalization/: a renamed or deleted one fails here."""
    script = load_script()
    rows = [script.read_run(label, path) for label, path in script.LEVERS]
    rows += [script.read_run(label, path, control=True) for label, path in script.CONTROLS]
    assert all(row["sources"] for row in rows) and len(rows) == len(script.LEVERS) + len(script.CONTROLS)
