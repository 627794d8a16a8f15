"""Hard benign negatives: counts, determinism, and a training half disjoint from the evaluation half."""

import pytest

from safegate.data import hard_negatives as hn
from safegate.data.leakage import check_disjoint, normalise_prompt


def test_counts_and_labels():
    train, held = hn.hard_negatives("train"), hn.hard_negatives("eval")
    assert len(train) == len(hn.TRAIN_TOPICS) * len(hn.TRAIN_TEMPLATES) + len(hn.TRAIN_HOMONYMS) == 230
    assert len(held) == len(hn.EVAL_TOPICS) * len(hn.EVAL_TEMPLATES) + len(hn.EVAL_HOMONYMS) == 210
    assert {r["label"] for r in train + held} == {"safe"}
    assert {r["split"] for r in train} == {"train"} and {r["split"] for r in held} == {"eval"}
    for records in (train, held):  # no duplicate prompt inside a half
        assert len({normalise_prompt(r["prompt"]) for r in records}) == len(records)


def test_deterministic():
    assert hn.hard_negatives("train") == hn.hard_negatives("train")
    assert hn.hard_negatives("eval") == hn.hard_negatives("eval")


def test_halves_share_no_topic_template_or_prompt():
    assert not set(hn.TRAIN_TOPICS) & set(hn.EVAL_TOPICS)
    assert not set(hn.TRAIN_TEMPLATES) & set(hn.EVAL_TEMPLATES)
    assert not {normalise_prompt(p) for p in hn.TRAIN_HOMONYMS} & {normalise_prompt(p) for p in hn.EVAL_HOMONYMS}
    # no training topic appears inside an evaluation prompt, and no evaluation topic in a training prompt
    train, held = hn.hard_negatives("train"), hn.hard_negatives("eval")
    assert not [t for t in hn.TRAIN_TOPICS for r in held if t in r["prompt"]]
    assert not [t for t in hn.EVAL_TOPICS for r in train if t in r["prompt"]]
    check_disjoint(train, held)
    for template in hn.TRAIN_TEMPLATES + hn.EVAL_TEMPLATES:
        assert template.count("{t}") == 1


def test_unknown_split():
    with pytest.raises(ValueError, match="`split` must be one of"):
        hn.hard_negatives("test")
