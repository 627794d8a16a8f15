"""`safegate bench`: the command line of the benchmark; writes the JSON results and prints a table of ratios.

Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser()
    >>> register(parser.add_subparsers())
    >>> args = parser.parse_args(["bench", "--shape", "tiny", "--pairs", "3"])
    >>> args.shape, args.pairs, args.ttft_pairs, args.out
    ('tiny', 3, None, 'benchmarks/results.json')
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from safegate.bench.bench import SHAPES, benchmark

__all__ = ["format_table", "register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="measure the gate's overhead (ratios gated/plain)")
    parser.add_argument(
        "--shape",
        choices=sorted(SHAPES),
        default=None,
        help="backbone shape (default: qwen2.5-0.5b on CUDA, smollm2-135m on CPU)",
    )
    parser.add_argument("--pairs", type=_positive_int, default=5, help="A/B pairs per measurement (median reported)")
    parser.add_argument(
        "--ttft-pairs",
        type=_positive_int,
        default=None,
        help="A/B pairs per time-to-first-token measurement (default: 3 x --pairs; one call costs a prefill only)",
    )
    parser.add_argument("--prompt-tokens", type=int, default=256, help="prompt length in tokens (default: 256)")
    parser.add_argument("--new-tokens", type=int, default=64, help="answer tokens per generate (default: 64)")
    parser.add_argument("--batch-sizes", default="1,8", help="comma-separated batch sizes (default: 1,8)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    parser.add_argument(
        "--members", type=_members, default=1, help="gates in the ensemble (GateConfig.members; default 1)"
    )
    parser.add_argument("--out", default="benchmarks/results.json", help="where to write the JSON results")
    parser.set_defaults(func=run)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: a median needs at least one pair; pass 1 or more")
    return value


def _members(text: str) -> int:
    """`--members`: checked by `GateConfig` itself (one rule for the range), before any model is built."""
    from safegate.modeling.config import GateConfig

    try:
        return GateConfig(members=int(text)).members
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def run(args: argparse.Namespace) -> int:
    shape = args.shape or ("qwen2.5-0.5b" if args.device.startswith("cuda") else "smollm2-135m")
    results = benchmark(
        shape=shape, pairs=args.pairs, ttft_pairs=args.ttft_pairs, prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens, batch_sizes=[int(b) for b in args.batch_sizes.split(",")], device=args.device,
        members=args.members,
    )  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(out)
    print(format_table(results))
    print(f"wrote {out}")
    return 0


def format_table(results: dict[str, Any]) -> str:
    gates = f", {results['members']} gates" if results.get("members", 1) > 1 else ""
    lines = [f"safegate bench — {results['shape']} on {results['machine']['device']} ({results['dtype']}{gates})", ""]
    lines.append(f"{'measurement':<52}{'plain':>10}{'gated':>10}{'ratio':>9}{'IQR':>16}")

    def row(name: str, r: dict[str, Any]) -> None:
        low, high = r.get("ratio_iqr", [r["ratio"], r["ratio"]])
        iqr = f"{low:.3f}-{high:.3f}"
        lines.append(f"{name:<52}{r['plain_s']:>10.3f}{r['gated_s']:>10.3f}{r['ratio']:>9.3f}{iqr:>16}")

    for path in results["generate"]:
        for key, r in results["generate"][path].items():
            row(f"generate, {path}, {key} (s)", r)
        for key, r in results["ttft"][path].items():
            row(f"time to first answer token, {path}, {key} (s)", r)
    for key, r in results["training_step"].items():
        row(f"training step vs plain LoRA, {key} (s)", r)
    lines.append(f"{'gate FLOPs / prefill FLOPs':<52}{'':>20}{results['flops']['ratio']:>9.2e}")
    plain_calls, gated_calls, calls_batch = (results["calls"][key] for key in ("plain", "gated", "batch"))
    for kind, label in (("aten_ops", "aten ops"), ("module_calls", "module calls")):
        for when in ("per_call", "per_step"):
            name = f"{label} {'per call (prefill)' if when == 'per_call' else 'per decode step'}, batch {calls_batch}"
            a, b = plain_calls[kind][when], gated_calls[kind][when]
            lines.append(f"{name:<52}{a:>10.0f}{b:>10.0f}{b / max(a, 1):>9.3f}")
    if "ratio" in results["memory"]:
        mem = results["memory"]
        name = "peak generate memory above resident (MB)"
        plain_mb, gated_mb = mem["plain_peak_extra_bytes"] / 1e6, mem["gated_peak_extra_bytes"] / 1e6
        lines.append(f"{name:<52}{plain_mb:>10.1f}{gated_mb:>10.1f}{mem['ratio']:>9.3f}")
    for name, b in results["bundle_bytes"].items():
        label = f"bundle bytes, Qwen2.5-Omni-{name.upper()}"
        lines.append(f"{label:<52}{'':>20}{b['total_bytes'] / 1e6:>7.1f}MB")
    return "\n".join(lines)
