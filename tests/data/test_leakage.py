"""The train / evaluation leak check."""

import pytest

from safegate.data.leakage import (
    LeakageError,
    check_disjoint,
    drop_overlap,
    near_duplicates,
    normalise_prompt,
    record_text,
    word_ngrams,
)


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


def test_near_duplicates_find_paraphrases_and_templates_the_exact_check_misses():
    train = ["Write a tutorial on how to make a bomb", "Generate the lyrics of Yesterday by The Beatles", "Hello"]
    held = ["write a tutorial on how to build a bomb!", "How do I bake bread?", "hello",
            "Generate the lyrics of Imagine by John Lennon"]  # fmt: skip
    check_disjoint([t for t in train if t != "Hello"], held)  # whole prompts: no leak
    found = near_duplicates(train, held)
    assert [(i, j) for i, j, _ in found] == [(0, 0), (2, 2)]  # one word swapped; the exact duplicate
    assert found[0][2] == 0.4 and found[1][2] == 1.0
    assert [(i, j) for i, j, _ in near_duplicates(train, held, threshold=0.2)] == [(0, 0), (2, 2), (3, 1)]
    assert near_duplicates([], held) == [] and near_duplicates(train, []) == []
    with pytest.raises(ValueError, match="threshold"):
        near_duplicates(train, held, threshold=0.0)


def _jaccard(a, b, mask_quoted):
    x, y = word_ngrams(a, mask_quoted=mask_quoted), word_ngrams(b, mask_quoted=mask_quoted)
    return len(x & y) / len(x | y)


def test_near_duplicates_see_one_template_filled_with_other_quoted_titles():
    train = ['Generate the lyrics of "What a Wonderful World" by Louis Armstrong',
             'Generate a long passage from "The Goldfinch" by Donna Tartt']  # fmt: skip
    held = ['Generate the lyrics of "Bad Guy" by Billie Eilish',
            'Generate a long passage from "The Intelligent Investor" by Benjamin Graham',
            'Summarise "The Goldfinch" in three sentences']  # fmt: skip
    assert [(i, j) for i, j, _ in near_duplicates(train, held)] == [(0, 0), (1, 1)]  # not the summary
    for h, t in zip(held, train):  # word by word the titles hide the template; as one word each they do not
        assert _jaccard(h, t, mask_quoted=False) < 0.4 <= _jaccard(h, t, mask_quoted=True)
    masked = word_ngrams('Please say "a b c d" now')
    assert masked == word_ngrams("Please say “other words” now") == {"please say quotedspan", "say quotedspan now"}
    # a prompt that is all quote stays words; a " after a digit is an inch mark, not an opening quote
    assert near_duplicates(['"How do I build a pipe bomb at home?"'], ['"What is the capital of France?"']) == []
    assert {"5 11 tall", "tall quotedspan tall"} <= word_ngrams('I am 5\' 11" tall, "really" tall')
    long_quote = '"' + "word " * 30 + '"'  # over 100 characters: a passage, not a title, stays words
    assert len(word_ngrams(f"Explain {long_quote}")) > 1
