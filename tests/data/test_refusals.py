"""The one refusal matcher: accuracy on human labels, the explicit mode, the window; templates and prompt."""

import pytest

from safegate.data.io import data_folder, read_objects
from safegate.data.refusals import (
    DECLINING_PHRASES,
    REFUSAL_PHRASES,
    REFUSAL_SYSTEM_PROMPT,
    REFUSAL_TEMPLATES,
    REFUSAL_WINDOW,
    is_refusal,
    template_refusal,
)


def test_the_phrase_list_agrees_with_the_human_labels_of_xstest():
    """Measured when the five lists were merged: 0.912 on the 2,250 completions (docs/real-model.md)."""
    folder = data_folder()
    if folder is None:
        pytest.skip("needs the development data folder (../shared/data or $SAFEGATE_DATA); a fresh clone has none")
    rows = [row for path in sorted((folder / "xstest").glob("completions_*.jsonl")) for row in read_objects(path)]
    agree = sum(is_refusal(r["response"]) == (r["human_label"] != "1_full_compliance") for r in rows)
    assert len(rows) == 2250 and agree / len(rows) >= 0.91


def test_the_list_is_lower_case_without_duplicates_and_the_declining_phrases_are_part_of_it():
    assert all(p == p.lower().strip() for p in REFUSAL_PHRASES)
    assert len(set(REFUSAL_PHRASES)) == len(REFUSAL_PHRASES) and set(DECLINING_PHRASES) < set(REFUSAL_PHRASES)


@pytest.mark.parametrize(
    "text, refusal, explicit",
    [
        ("I\u2019m sorry,   but\nI can\u2019t help with that.", True, True),
        ("I'm sorry to hear that. Here is what to do.", True, False),
        ("As an AI, I think the answer is 4.", True, False),
        ("Sure! Step 1: mix the chemicals.", False, False),
        ("", True, False),
        ("Photosynthesis turns light into sugar. " * 10 + "I cannot stress this enough.", False, False),
    ],
)
def test_matching_rule(text, refusal, explicit):
    assert is_refusal(text) is refusal and is_refusal(text, explicit=True) is explicit


def test_the_window_and_the_phrases_are_parameters_of_the_one_function():
    late = "x" * (REFUSAL_WINDOW + 10) + " I cannot do that."
    assert not is_refusal(late) and is_refusal(late, window=len(late))
    assert is_refusal("Nope.", phrases=("nope",)) and not is_refusal("Nope.")


def test_templates_refuse_are_varied_and_picked_deterministically():
    assert len(set(REFUSAL_TEMPLATES)) >= 8 and all(is_refusal(t, explicit=True) for t in REFUSAL_TEMPLATES)
    assert len({template_refusal(f"request {i}") for i in range(50)}) >= 6
    assert template_refusal("x", seed=1) == template_refusal("x", seed=1) != template_refusal("x", seed=2)
    assert "harmful" in REFUSAL_SYSTEM_PROMPT and "Refuse" in REFUSAL_SYSTEM_PROMPT
