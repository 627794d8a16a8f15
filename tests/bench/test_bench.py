"""Smoke test of the benchmark: it completes on a tiny shape and writes valid JSON (no timing assertions)."""

import json

import pytest
import torch

from safegate.bench.bench import benchmark
from safegate.bench.costs import gate_flops
from safegate.bench.memory import cpu_peak_bytes
from safegate.cli import main


def _bench(tmp_path, *args):
    """`safegate bench` on the tiny shape, 16 prompt tokens, 2 new ones; its results.json."""
    out = tmp_path / "results.json"
    assert main(["bench", "--shape", "tiny", "--pairs", "1", "--prompt-tokens", "16", "--new-tokens", "2",
                 *args, "--out", str(out)]) == 0  # fmt: skip
    return json.loads(out.read_text())


def test_bench_smoke_writes_valid_json(tmp_path, capsys):
    results = _bench(tmp_path, "--ttft-pairs", "2", "--batch-sizes", "1,2", "--device", "cpu")
    assert set(results["generate"]) == set(results["ttft"]) == {"benign", "harmful", "benign_base_answer", "control"}
    rows = [*results["training_step"].values()]
    for path in ("benign", "harmful", "benign_base_answer", "control"):
        assert set(results["generate"][path]) == set(results["ttft"][path]) == {"batch_1", "batch_2"}
        rows += [*results["generate"][path].values(), *results["ttft"][path].values()]
        assert all(len(row["ratios"]) == 2 for row in results["ttft"][path].values())
    assert set(results["training_step"]) == {"prompt_96_response_32", "prompt_16_response_112"}
    for row in rows:
        assert row["ratio"] > 0 and row["plain_s"] > 0 and row["gated_s"] > 0
        assert row["ratio_iqr"][0] <= row["ratio"] <= row["ratio_iqr"][1] and len(row["ratios"]) in (1, 2)
    step = results["training_step"]["prompt_96_response_32"]["logit_rows"]
    assert step == {"plain": 8 * 128, "gated": 8 + 8 * 31}
    assert 0 < results["flops"]["ratio"] < 1
    assert results["commit"] is None or len(results["commit"]) >= 7
    plain, gated = results["calls"]["plain"], results["calls"]["gated"]
    assert gated["aten_ops"]["per_step"] == plain["aten_ops"]["per_step"] > 0, "no gate work after the prefill"
    assert gated["aten_ops"]["per_call"] > plain["aten_ops"]["per_call"] > 0
    memory = results["memory"]
    assert memory["plain_peak_extra_bytes"] > 0 and memory["gated_peak_extra_bytes"] > 0 and memory["ratio"] > 0
    assert results["bundle_bytes"]["7b"]["total_bytes"] > results["bundle_bytes"]["3b"]["total_bytes"] > 1e6
    assert "time to first answer token, harmful, batch_2" in capsys.readouterr().out


def test_bench_refuses_zero_pairs_before_building_anything(monkeypatch, capsys):
    def no_backbone(*args, **kwargs):
        raise AssertionError("built a backbone before checking the pair counts")

    monkeypatch.setattr("safegate.bench.bench._backbone", no_backbone)
    with pytest.raises(ValueError, match="ttft_pairs=0"):
        benchmark(shape="tiny", pairs=1, ttft_pairs=0, progress=False)
    with pytest.raises(SystemExit):
        main(["bench", "--shape", "tiny", "--ttft-pairs", "0"])
    err = capsys.readouterr().err
    assert "argument --ttft-pairs" in err and "at least one pair" in err


def test_cpu_peak_counts_what_is_alive_at_once():
    def call() -> torch.Tensor:
        big = torch.ones(2_000_000)  # 8 MB
        del big
        return torch.ones(1_000_000)  # 4 MB, allocated after the 8 MB were freed

    peak = cpu_peak_bytes(call)
    assert 8_000_000 <= peak < 12_000_000


OLD_PUBLIC_NAMES = ["register", "run", "benchmark", "gate_flops", "training_step_ratio", "cuda_peak_bytes",
                    "cpu_peak_bytes", "omni_bundle_bytes", "format_table"]  # fmt: skip


@pytest.mark.parametrize("name", OLD_PUBLIC_NAMES)
def test_old_public_name_of_safegate_bench_resolves_to_its_home(name):
    import importlib

    import safegate.bench

    assert getattr(safegate.bench, name) is getattr(importlib.import_module(safegate.bench.HOMES[name]), name)


def test_bench_measures_an_ensemble_of_gates(tmp_path, capsys):
    results = _bench(tmp_path, "--ttft-pairs", "1", "--batch-sizes", "1", "--members", "3")
    assert results["members"] == 3
    one = gate_flops(hidden=64, attention_dim=256, prompt_tokens=16, params=10**6)["gate"]
    assert results["flops"]["gate"] == 3 * one  # three gates read the same prompt states
    assert "3 gates" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["bench", "--shape", "tiny", "--members", "0"])
    assert "argument --members" in capsys.readouterr().err
