"""The call counter behind the bench's op counts: what it counts, and that it leaves nothing behind."""

import threading

import pytest
import torch
from torch import nn

from safegate.bench.op_count import CallCounter, generate_call_counts
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


def test_ignores_module_calls_of_other_threads_and_refuses_reentry():
    net = nn.Linear(4, 3)
    with CallCounter() as counter:
        worker = threading.Thread(target=lambda: net(torch.ones(1, 4)))
        worker.start()
        worker.join()
        assert counter.module_calls == 0
        with pytest.raises(RuntimeError, match="already counting"):
            counter.__enter__()
        net(torch.ones(1, 4))
    assert counter.module_calls == 1


def test_every_decode_step_of_a_plain_generate_costs_the_same():
    model, tok = tiny_model_and_tokenizer("llama")
    inputs = dict(tok("Counting the work of a decode step.", return_tensors="pt"))
    four, eight = generate_call_counts(model.generate, inputs, steps=4), generate_call_counts(model.generate, inputs)
    for kind in ("aten_ops", "module_calls"):
        assert eight[kind]["per_call"] == four[kind]["per_call"]
        assert eight[kind]["per_step"] == four[kind]["per_step"] > 0  # steps 2-5 cost what steps 2-9 cost on average
    assert four["aten_ops"]["per_call"] > four["aten_ops"]["per_step"]  # the prefill and generate's setup
