"""Benchmarks: paired, interleaved gated/plain timings (`safegate bench`) and counted ops (`op_count`).

`safegate.bench` was a module before the 0.2 layout; its public names still resolve here, lazily.
"""

from safegate._lazy import lazy_attributes

__getattr__ = lazy_attributes(
    __name__,
    {
        name: "safegate.bench.bench"
        for name in (
            "register",
            "run",
            "benchmark",
            "gate_flops",
            "training_step_ratio",
            "cuda_peak_bytes",
            "cpu_peak_bytes",
            "omni_bundle_bytes",
            "format_table",
        )
    },
)
