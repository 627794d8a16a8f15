"""Benchmarks: paired, interleaved gated/plain timings (`safegate bench`) and counted ops (`op_count`).

Modules: `bench` (`benchmark`: every measurement), `cli` (the `safegate bench` command), `timing` (paired
timings), `memory` (peak memory), `training_step` (CASA step vs a plain LoRA step), `costs` (FLOPs, bundle bytes),
`op_count` (counted aten ops and module calls).

`safegate.bench` was a module before the 0.2 layout; its public names still resolve here, lazily.
"""

from safegate._lazy import lazy_attributes

HOMES = {
    "register": "safegate.bench.cli",
    "run": "safegate.bench.cli",
    "format_table": "safegate.bench.cli",
    "benchmark": "safegate.bench.bench",
    "gate_flops": "safegate.bench.costs",
    "omni_bundle_bytes": "safegate.bench.costs",
    "training_step_ratio": "safegate.bench.training_step",
    "cuda_peak_bytes": "safegate.bench.memory",
    "cpu_peak_bytes": "safegate.bench.memory",
}
"""Public name -> the module that defines it."""

__getattr__ = lazy_attributes(__name__, HOMES)
