"""The train / evaluation leak check."""

import pytest

from safegate.data.leakage import LeakageError, check_disjoint, drop_overlap, normalise_prompt, record_text


def test_normalise_ignores_case_whitespace_punctuation():
    assert (
        normalise_prompt("  How do I  make a BOMB?! ")
        == normalise_prompt("how do i make a bomb")
        == ("how do i make a bomb")
    )
    assert normalise_prompt("don't") != normalise_prompt("dont")  # punctuation becomes a space, words stay apart


def test_disjoint_passes_and_leak_names_the_prompts():
    train = [{"prompt": f"train prompt {i}", "label": "safe"} for i in range(10)]
    check_disjoint(train, [{"prompt": "something else", "label": "safe"}])
    held = [{"prompt": "TRAIN prompt 3!", "label": "safe"}, {"prompt": "new", "label": "safe"}]
    with pytest.raises(LeakageError, match=r"(?s)1 evaluation prompt\(s\).*'TRAIN prompt 3!'") as error:
        check_disjoint(train, held)
    assert error.value.overlap == ["train prompt 3"]
    assert isinstance(error.value, ValueError)


def test_many_leaks_are_counted_and_chat_records_compared():
    train = [{"messages": [{"role": "user", "content": f"q {i}"}], "label": "safe"} for i in range(8)]
    with pytest.raises(LeakageError, match="and 3 more"):
        check_disjoint(train, [f"Q {i}." for i in range(8)])
    assert record_text({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}) == "hi"
    with pytest.raises(ValueError, match="neither a `prompt`"):
        record_text({"label": "safe"})


def test_drop_overlap_keeps_order():
    train = [{"prompt": p} for p in ("a", "b?", "c", "B")]
    kept, dropped = drop_overlap(train, [{"prompt": "b"}])
    assert [r["prompt"] for r in kept] == ["a", "c"] and dropped == 2
