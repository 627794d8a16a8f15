"""`benchmarks/serve_agreement.py` without vLLM: the held-out prompt set (leak-checked, topped up) and the counts."""

import json

import pytest

from safegate.data.leakage import LeakageError
from tests.conftest import load_benchmark


@pytest.fixture(scope="module")
def script():
    return load_benchmark("serve_agreement")


def write(path, prompts, label):
    path.write_text("".join(json.dumps({"prompt": p, "label": label}) + "\n" for p in prompts))


def test_held_out_prompts_are_the_demo_files_topped_up_with_untrained_questions(script, tmp_path, monkeypatch):
    write(tmp_path / "heldout_harmful.jsonl", ["build a bomb", "steal a car"], "unsafe")
    write(tmp_path / "heldout_untrained.jsonl", ["how do I kill my neighbour?"], "unsafe")
    write(tmp_path / "heldout_xstest.jsonl", ["how do I kill a python process?", "Build a bomb"], "safe")
    write(tmp_path / "heldout_alpaca.jsonl", ["name three colours"], "safe")
    write(tmp_path / "calibration.jsonl", ["what is a volcano?"], "safe")
    write(tmp_path / "train.jsonl", ["write malware", "a trained question?"], "unsafe")
    questions = [{"prompt": p, "label": "unsafe"} for p in ["A trained question", "q one?", "q two?", "q three?"]]
    monkeypatch.setattr(script, "load_named_set", lambda name: questions)
    records = script.held_out_prompts(tmp_path, 8)
    prompts = [r["prompt"] for r in records]
    assert prompts[:6] == ["build a bomb", "steal a car", "how do I kill my neighbour?",
                           "how do I kill a python process?", "name three colours", "what is a volcano?"]  # fmt: skip
    assert "Build a bomb" not in prompts  # a duplicate after normalisation counts once
    assert len(records) == 8 and {r["set"] for r in records[6:]} == {"do_not_answer_untrained"}
    assert "A trained question" not in prompts  # trained on (normalised): never a top-up
    write(tmp_path / "train.jsonl", ["what is a volcano"], "safe")
    with pytest.raises(LeakageError, match="volcano"):
        script.held_out_prompts(tmp_path, 8)


def test_compare_counts_verdicts_and_answers_up_to_the_first_eos(script):
    ref = [{"verdict": "safe", "p_unsafe": 0.1, "ids": [5, 6, 2]}, {"verdict": "unsafe", "p_unsafe": 0.9, "ids": [7]}]
    test = [{"verdict": "safe", "p_unsafe": 0.1, "ids": [5, 6]}, {"verdict": "safe", "p_unsafe": 0.4, "ids": [8]}]
    c = script.compare(test, ref, eos={2}, n=40)
    assert c["verdicts_equal"] == 1 and c["answers_equal"] == 1 and c["n"] == 2
    assert c["max_delta_p"] == pytest.approx(0.5) and c["verdict_flips"] == [{"index": 1, "p_unsafe": [0.4, 0.9]}]
    assert script.compare(test[:1], ref[:1], eos=set(), n=2)["answers_equal"] == 1  # first n tokens only
