"""The call counter behind the bench's op counts: what it counts, and that it leaves nothing behind."""

import torch
from torch import nn

from safegate.op_count import CallCounter, generate_call_counts
from safegate.testing import tiny_model_and_tokenizer


def test_counts_nested_module_calls_and_ops_only_inside_the_context():
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
    x = torch.ones(2, 4)
    with CallCounter() as counter:
        net(x)
    assert counter.module_calls == 3  # the Sequential and its two children
    seen = (counter.aten_ops, counter.module_calls)
    assert seen[0] >= 2  # at least the product and the relu
    net(x)  # outside: neither the dispatch mode nor the global hook is left behind
    assert (counter.aten_ops, counter.module_calls) == seen


def test_per_step_counts_of_a_plain_generate_are_whole_and_positive():
    model, tok = tiny_model_and_tokenizer("llama")
    ids = tok("Counting the work of a decode step.", return_tensors="pt")
    counts = generate_call_counts(model.generate, dict(ids), steps=4)
    per_step = counts["aten_ops"]["per_step"]
    assert per_step > 0 and per_step == int(per_step), "every decode step dispatches the same ops"
    assert counts["aten_ops"]["per_call"] > per_step  # the prefill and generate's setup
