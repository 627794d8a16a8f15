"""`safegate bench`: measured overhead of the gate, as paired and interleaved ratios (A B, B A, ..., median).

Measures on a random-initialised backbone of realistic shape (default: Qwen2.5-0.5B on a GPU, SmolLM2-135M on a
CPU; `--shape tiny` for a smoke run): gated/plain `generate` wall time (batch 1 and 8; 256-token prompt, 64 new
answer tokens) and time to the first answer token, each for a benign request (the gate says safe: the usual path)
and a harmful one (unsafe: the speculated `<|safe|>` is replaced, one extra decode step); gate FLOPs vs prefill
FLOPs (computed); the CASA training step vs a plain PEFT LoRA step (same LoRA config, same batch, prompt labels
masked as in supervised fine-tuning) for a prompt-heavy and a response-heavy batch; peak memory; the torch ops and
module calls of one `generate` and of each decode step (counted, `safegate.bench.op_count`: the host-side cost that
bounds a small model on a GPU, the same on every run); bundle bytes for Qwen2.5-Omni-3B/7B shapes (computed on
the `meta` device, no weights). Writes JSON; absolute times depend on the machine, ratios are what to compare.

Example:
    >>> omni_bundle_bytes("7b")["total_bytes"] < 30e6
    True
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import torch

from safegate.bench.op_count import generate_call_counts

SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": dict(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
    ),
    "smollm2-135m": dict(
        model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
    ),
    "small": dict(
        hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=32000, tie_word_embeddings=True,
    ),
    "tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=True,
    ),
}  # fmt: skip
OMNI_TEXT = {
    "3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
               num_key_value_heads=2, vocab_size=151936),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064),
}  # fmt: skip


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
    parser.add_argument("--out", default="benchmarks/results.json", help="where to write the JSON results")
    parser.set_defaults(func=run)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: a median needs at least one pair; pass 1 or more")
    return value


def run(args: argparse.Namespace) -> int:
    shape = args.shape or ("qwen2.5-0.5b" if args.device.startswith("cuda") else "smollm2-135m")
    results = benchmark(
        shape=shape, pairs=args.pairs, ttft_pairs=args.ttft_pairs, prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens, batch_sizes=[int(b) for b in args.batch_sizes.split(",")], device=args.device,
    )  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(out)
    print(format_table(results))
    print(f"wrote {out}")
    return 0


def _backbone(shape: str, device: str, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from safegate.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    fields = dict(SHAPES[shape])
    llama = fields.pop("model_type", "qwen2") == "llama"
    config_class, model_class = (LlamaConfig, LlamaForCausalLM) if llama else (Qwen2Config, Qwen2ForCausalLM)
    config = config_class(max_position_embeddings=4096, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                          bos_token_id=None, **fields)  # fmt: skip
    model = model_class(config).to(device=device, dtype=dtype).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _paired(a: Callable[[], Any], b: Callable[[], Any], pairs: int, device: str) -> dict[str, float]:
    """Median of b/a wall-time ratios over interleaved pairs (A B, B A, ...), after one warm-up each."""

    def timed(fn: Callable[[], Any]) -> Callable[[], float]:
        def run() -> float:
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            return time.perf_counter() - start

        return run

    return _paired_values(timed(a), timed(b), pairs)


def _summary(ratios: list[float], plain: list[float], gated: list[float]) -> dict[str, Any]:
    """Median ratio with its interquartile range (the noise of the machine), median times, every pair's ratio."""
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return {"ratio": statistics.median(ratios), "ratio_iqr": [quartiles[0], quartiles[2]],
            "plain_s": statistics.median(plain), "gated_s": statistics.median(gated), "ratios": ratios}  # fmt: skip


class _FirstTokenClock:
    """Streamer that records when the first generated (answer) token arrives."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first: float | None = None
        self.puts = 0

    def put(self, value: torch.Tensor) -> None:
        self.puts += 1
        if self.puts == 2 and self.first is None:
            self.first = time.perf_counter() - self.start

    def end(self) -> None:
        pass


#: What the gate decides in each measured path: a confident gate (read-out bias) stands in for a trained one.
#: The results also hold a `control` path: the plain model against a copy of itself (the noise floor).
VERDICTS = {"benign": ("safe", -30.0), "harmful": ("unsafe", 30.0)}


def benchmark(
    shape: str = "qwen2.5-0.5b",
    pairs: int = 5,
    prompt_tokens: int = 256,
    new_tokens: int = 64,
    batch_sizes: list[int] | None = None,
    device: str = "cpu",
    progress: bool = True,
    ttft_pairs: int | None = None,
) -> dict[str, Any]:
    """Run every measurement and return a JSON-able dict (`progress`: a tqdm bar on stderr).

    `ttft_pairs` (default `3 * pairs`): pairs for the time to the first answer token, which costs one prefill per
    call, so more pairs narrow its median where a few-percent target sits inside the machine's noise.
    """
    from tqdm.auto import tqdm

    import safegate

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    ttft_pairs = 3 * pairs if ttft_pairs is None else ttft_pairs
    for name, value in (("pairs", pairs), ("ttft_pairs", ttft_pairs)):
        if value < 1:
            raise ValueError(f"{name}={value}: a median needs at least one pair; pass {name} >= 1")
    model, tok = _backbone(shape, device, dtype)
    plain = copy.deepcopy(model)
    gated = safegate.attach(model, tok)
    gated.merge_adapter()
    vocab = min(len(tok) - 2, model.config.vocab_size)
    results: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": _commit(),
        "machine": _machine(device),
        "shape": shape,
        "config": SHAPES[shape],
        "dtype": str(dtype),
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "pairs": pairs,
        "ttft_pairs": ttft_pairs,
        "generate": {},
        "ttft": {},
    }
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    batches = {}
    for batch in batch_sizes or [1, 8]:
        torch.manual_seed(batch)
        header = gated.assistant_header_ids or []  # prompts end with the assistant header, as chat prompts do
        ids = torch.randint(4, vocab, (batch, prompt_tokens - len(header)), device=device)
        ids = torch.cat([ids, torch.tensor([header] * batch, dtype=ids.dtype, device=device)], dim=1)
        batches[batch] = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    total = 2 * (len(VERDICTS) + 1) * len(batches) + 2  # generate + first token per path and batch; training
    bar = tqdm(total=total, desc="safegate bench", unit="measurement", disable=not progress)
    for path, (label, bias) in VERDICTS.items():
        with torch.no_grad():
            gated.gate.out.bias.fill_(bias)
        results["generate"][path], results["ttft"][path] = {}, {}
        for batch, inputs in batches.items():
            with torch.no_grad():
                decided = gated.generate(**inputs, max_new_tokens=1, return_dict_in_generate=True).safety
            if set(decided) != {label}:
                raise RuntimeError(f"the {path} path should decide {label!r}, the gate said {decided}")
            key = f"batch_{batch}"
            bar.set_postfix_str(f"{path}, {key}")
            results["generate"][path][key], results["ttft"][path][key] = _generate_pair(
                plain.generate, gated.generate, inputs, gen, (pairs, ttft_pairs), device
            )
            bar.update(2)
    # A/A control: the plain model against an identical copy of itself shows how far the machine's noise reaches
    twin = copy.deepcopy(plain)
    results["generate"]["control"], results["ttft"]["control"] = {}, {}
    for batch, inputs in batches.items():
        key = f"batch_{batch}"
        bar.set_postfix_str(f"control, {key}")
        results["generate"]["control"][key], results["ttft"]["control"][key] = _generate_pair(
            plain.generate, twin.generate, inputs, gen, (pairs, ttft_pairs), device
        )
        bar.update(2)
    del twin
    with torch.no_grad():
        gated.gate.out.bias.fill_(VERDICTS["benign"][1])
    results["memory"] = _memory(device, plain, gated, batches[max(batches)], gen)
    smallest = min(batches)
    results["calls"] = {"batch": smallest}
    for name, fn in (("plain", plain.generate), ("gated", gated.generate)):
        results["calls"][name] = generate_call_counts(fn, batches[smallest])
    results["flops"] = gate_flops(model.config.hidden_size, gated.gate_config.attention_dim, prompt_tokens,
                                  sum(p.numel() for p in plain.parameters()))  # fmt: skip
    results["training_step"] = {}
    for prompt in (96, 16):
        key = f"prompt_{prompt}_response_{128 - prompt}"
        bar.set_postfix_str(f"training step, {key}")
        results["training_step"][key] = training_step_ratio(gated, plain, vocab, device, pairs, prompt)
        bar.update()
    bar.close()
    results["bundle_bytes"] = {name: omni_bundle_bytes(name) for name in OMNI_TEXT}
    return results


def _generate_pair(
    a: Callable[..., Any],
    b: Callable[..., Any],
    inputs: dict[str, Any],
    gen: dict[str, Any],
    pairs: tuple[int, int],
    device: str,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Paired wall times of two `generate` callables: the whole answer, and the time to its first token
    (`pairs`: how many pairs for each)."""

    def ttft(fn: Callable[..., Any]) -> float:
        clock = _FirstTokenClock()
        _sync(device)
        clock.start = time.perf_counter()
        fn(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False, streamer=clock)
        return clock.first or float("nan")

    with torch.no_grad():
        whole = _paired(lambda: a(**inputs, **gen), lambda: b(**inputs, **gen), pairs[0], device)
        first = _paired_values(lambda: ttft(a), lambda: ttft(b), pairs[1])
    return whole, first


def _paired_values(a: Callable[[], float], b: Callable[[], float], pairs: int) -> dict[str, float]:
    """Median of b()/a() over interleaved pairs (A B, B A, ...) of measured values, after one warm-up each."""
    a(), b()
    va, vb = [], []
    for i in range(pairs):
        if i % 2 == 0:
            va.append(a())
            vb.append(b())
        else:
            vb.append(b())
            va.append(a())
    return _summary([y / x for x, y in zip(va, vb, strict=True)], va, vb)


def gate_flops(hidden: int, attention_dim: int, prompt_tokens: int, params: int) -> dict[str, float]:
    """Multiply-adds x2 of the gate (O(T d) form) vs the prefill of the backbone (2 * params * T)."""
    gate = 2 * (hidden * attention_dim + 2 * prompt_tokens * hidden + hidden * attention_dim + 3 * attention_dim)
    prefill = 2 * params * prompt_tokens
    return {"gate": float(gate), "prefill": float(prefill), "ratio": gate / prefill}


def training_step_ratio(
    gated: Any, plain: Any, vocab: int, device: str, pairs: int, prompt: int, length: int = 128, batch: int = 8
) -> dict[str, Any]:
    """CASA step (`training.objective.casa_loss`) vs a plain PEFT LoRA step: same LoRA config, batch and targets.

    Each row holds `prompt` prompt tokens, the safety token and `length - prompt - 1` response tokens; half the rows
    are harmful. The plain step is supervised fine-tuning as PEFT users run it: `labels` with the prompt masked
    (-100), transformers' own loss.
    """
    from peft import LoraConfig

    from safegate.modeling.model import quiet_get_peft_model
    from safegate.training.objective import casa_loss

    config = gated.gate_config
    gated.unmerge_adapter()
    gated.train()
    lora = quiet_get_peft_model(copy.deepcopy(plain), LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha,
                                lora_dropout=config.lora_dropout, target_modules=gated.arch.lora_target))  # fmt: skip
    lora.train()
    torch.manual_seed(0)
    ids = torch.randint(4, vocab, (batch, length), device=device)
    ids[:, prompt] = torch.tensor([gated.safe_token_id, gated.unsafe_token_id] * (batch // 2), device=device)
    labels = ids.clone()
    labels[:, : prompt + 1] = -100
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    casa_batch = dict(
        inputs, labels=labels, prompt_mask=(torch.arange(length, device=device) < prompt).long().expand(batch, -1),
        class_labels=torch.tensor([0, 1] * (batch // 2), device=device),
        safety_index=torch.full((batch,), prompt - 1, device=device),
    )  # fmt: skip
    opt_plain = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-4)
    opt_gated = torch.optim.AdamW([p for p in gated.parameters() if p.requires_grad], lr=1e-4)

    def plain_step() -> None:
        out = lora(**inputs, labels=labels, use_cache=False)
        out.loss.backward()
        opt_plain.step()
        opt_plain.zero_grad()

    def gated_step() -> None:
        loss = casa_loss(gated, casa_batch).loss
        loss.backward()
        opt_gated.step()
        opt_gated.zero_grad()

    result = _paired(plain_step, gated_step, pairs, device)
    result["logit_rows"] = {"plain": batch * length, "gated": batch + int((labels[:, 1:] != -100).sum())}
    gated.eval()
    gated.merge_adapter()
    return result


def _memory(device: str, plain: Any, gated: Any, inputs: dict[str, Any], gen: dict[str, Any]) -> dict[str, Any]:
    """Peak memory of one generate call (last batch size) above what is resident before it.

    CUDA: `torch.cuda.max_memory_allocated`. CPU: the torch profiler's allocation records, summed in time order
    (allocations net of frees within each op, so a peak inside one op is seen at its end).
    """
    peaks = {}
    for name, fn in (("plain", plain.generate), ("gated", gated.generate)):
        with torch.no_grad():
            call = partial(fn, **inputs, **gen)
            peaks[name] = cuda_peak_bytes(call) if device.startswith("cuda") else cpu_peak_bytes(call)
    method = "torch.cuda.max_memory_allocated" if device.startswith("cuda") else "torch.profiler(profile_memory=True)"
    return {"plain_peak_extra_bytes": peaks["plain"], "gated_peak_extra_bytes": peaks["gated"],
            "ratio": peaks["gated"] / max(peaks["plain"], 1), "method": method}  # fmt: skip


def cuda_peak_bytes(call: Callable[[], Any]) -> int:
    """Peak CUDA memory allocated during `call()` above what was allocated before it."""
    torch.cuda.synchronize()
    resident = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    call()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - resident


def cpu_peak_bytes(call: Callable[[], Any]) -> int:
    """Peak CPU memory torch allocates during `call()` (profiler records: net per op, summed in time order).

    Example:
        >>> cpu_peak_bytes(lambda: torch.ones(1000, 1000).sum()) >= 4_000_000
        True
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call()
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    current = peak = 0
    for event in events:
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


def omni_bundle_bytes(size: str, lora_r: int = 8, attention_dim: int = 256) -> dict[str, Any]:
    """Bytes of a default bundle for the Qwen2.5-Omni thinker of `size` ("3b"/"7b"), counted on the meta device."""
    from transformers import Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration

    from safegate.modeling.arch import resolve
    from safegate.modeling.config import GateConfig

    rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}
    text = dict(OMNI_TEXT[size], rope_parameters=rope)
    config = Qwen2_5OmniThinkerConfig(text_config=text, vision_start_token_id=151652)
    config.vision_config.out_hidden_size = config.audio_config.output_dim = text["hidden_size"]
    with torch.device("meta"):
        thinker = Qwen2_5OmniThinkerForConditionalGeneration(config)
    defaults = GateConfig(lora_r=lora_r, attention_dim=attention_dim)
    arch = resolve(thinker, defaults.lora_target, defaults.lora_modules)
    import re

    pattern = re.compile(arch.lora_target)
    lora = sum(lora_r * (m.in_features + m.out_features) for n, m in thinker.named_modules()
               if isinstance(m, torch.nn.Linear) and pattern.fullmatch(n))  # fmt: skip
    d = text["hidden_size"]
    gate = 3 * d * attention_dim + 2 * attention_dim + attention_dim + 1 + d
    rows = 2 * d * (1 if arch.tied else 2)
    total = 4 * lora + 4 * gate + 4 * rows
    return {"lora_params": lora, "gate_params": gate, "token_row_params": rows, "total_bytes": total,
            "note": "float32 tensors; json/README add a few KB"}  # fmt: skip


def _commit() -> str | None:
    """The safegate checkout's git commit the numbers come from (`None` outside a git checkout)."""
    import subprocess

    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                              capture_output=True, text=True, timeout=10, check=True)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def _machine(device: str) -> dict[str, Any]:
    import peft
    import transformers

    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "device": device,
            "threads": torch.get_num_threads()}  # fmt: skip
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def format_table(results: dict[str, Any]) -> str:
    lines = [f"safegate bench — {results['shape']} on {results['machine']['device']} ({results['dtype']})", ""]
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
