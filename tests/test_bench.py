"""Smoke test of the benchmark: it completes on a tiny shape and writes valid JSON (no timing assertions)."""

import json

from safegate.cli import main


def test_bench_smoke_writes_valid_json(tmp_path):
    out = tmp_path / "results.json"
    code = main(["bench", "--shape", "tiny", "--pairs", "1", "--prompt-tokens", "16", "--new-tokens", "2",
                 "--batch-sizes", "1,2", "--device", "cpu", "--out", str(out)])  # fmt: skip
    assert code == 0
    results = json.loads(out.read_text())
    assert set(results["generate"]) == {"batch_1", "batch_2"} and "batch_1" in results["ttft"]
    for row in [*results["generate"].values(), *results["ttft"].values(), results["training_step"]]:
        assert row["ratio"] > 0 and row["plain_s"] > 0 and row["gated_s"] > 0
    assert 0 < results["flops"]["ratio"] < 1
    assert results["bundle_bytes"]["7b"]["total_bytes"] > results["bundle_bytes"]["3b"]["total_bytes"] > 1e6
