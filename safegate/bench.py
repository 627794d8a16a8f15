"""`safegate bench`: measured overhead of the gate, as paired and interleaved ratios (A B A B ..., median).

Measures on a random-initialised backbone of realistic shape (default: Qwen2.5-0.5B; `--shape tiny` for a
smoke run): gated/plain `generate` wall time (batch 1 and 8; 256-token prompt, 64 new answer tokens),
time-to-first-answer-token, gate FLOPs vs prefill FLOPs (computed), the CASA training step vs a plain PEFT LoRA
step on the same batch, peak memory, and bundle bytes for Qwen2.5-Omni-3B/7B shapes (computed on the `meta`
device, no weights). Writes JSON; absolute times depend on the machine, ratios are what to compare.

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
from pathlib import Path
from typing import Any

import torch

SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": dict(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
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
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b")
    parser.add_argument("--pairs", type=int, default=5, help="A/B pairs per measurement (median reported)")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="benchmarks/results.json")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    results = benchmark(
        shape=args.shape, pairs=args.pairs, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
        batch_sizes=[int(b) for b in args.batch_sizes.split(",")], device=args.device,
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
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from .testing import tiny_tokenizer

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    config = Qwen2Config(max_position_embeddings=4096, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         bos_token_id=None, **SHAPES[shape])  # fmt: skip
    model = Qwen2ForCausalLM(config).to(device=device, dtype=dtype).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _paired(a: Callable[[], Any], b: Callable[[], Any], pairs: int, device: str) -> dict[str, float]:
    """Median of b/a over interleaved pairs (A B, B A, ... alternating order), after one warm-up each."""
    a(), b()
    ratios, times_a, times_b = [], [], []
    for i in range(pairs):
        order = (a, b) if i % 2 == 0 else (b, a)
        elapsed = {}
        for fn in order:
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            elapsed[fn] = time.perf_counter() - start
        times_a.append(elapsed[a])
        times_b.append(elapsed[b])
        ratios.append(elapsed[b] / elapsed[a])
    return {"ratio": statistics.median(ratios), "plain_s": statistics.median(times_a),
            "gated_s": statistics.median(times_b), "ratios": ratios}  # fmt: skip


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


def benchmark(
    shape: str = "qwen2.5-0.5b",
    pairs: int = 5,
    prompt_tokens: int = 256,
    new_tokens: int = 64,
    batch_sizes: list[int] | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Run every measurement and return a JSON-able dict."""
    import safegate

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model, tok = _backbone(shape, device, dtype)
    plain = copy.deepcopy(model)
    gated = safegate.attach(model, tok)
    gated.merge_adapter()
    vocab = min(len(tok) - 2, model.config.vocab_size)
    results: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": _machine(device),
        "shape": shape,
        "config": SHAPES[shape],
        "dtype": str(dtype),
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "pairs": pairs,
        "generate": {},
        "ttft": {},
    }
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    for batch in batch_sizes or [1, 8]:
        torch.manual_seed(batch)
        header = gated._header or []  # prompts end with the assistant header, as chat prompts do
        ids = torch.randint(4, vocab, (batch, prompt_tokens - len(header)), device=device)
        ids = torch.cat([ids, torch.tensor([header] * batch, dtype=ids.dtype, device=device)], dim=1)
        inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
        with torch.no_grad():
            results["generate"][f"batch_{batch}"] = _paired(
                lambda inputs=inputs: plain.generate(**inputs, **gen),
                lambda inputs=inputs: gated.generate(**inputs, **gen),
                pairs,
                device,
            )

            def ttft(fn: Callable[..., Any], inputs: dict[str, Any] = inputs) -> float:
                clock = _FirstTokenClock()
                _sync(device)
                fn(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False, streamer=clock)
                return clock.first or float("nan")

            if batch == 1:  # transformers streamers take one row
                results["ttft"][f"batch_{batch}"] = _paired_values(
                    lambda: ttft(plain.generate), lambda: ttft(gated.generate), pairs
                )
    results["memory"] = _memory(device, plain, gated, inputs, gen)
    results["flops"] = gate_flops(model.config.hidden_size, gated.gate_config.attention_dim, prompt_tokens,
                                  sum(p.numel() for p in plain.parameters()))  # fmt: skip
    results["training_step"] = training_step_ratio(gated, plain, tok, vocab, device, pairs)
    results["bundle_bytes"] = {name: omni_bundle_bytes(name) for name in OMNI_TEXT}
    return results


def _paired_values(a: Callable[[], float], b: Callable[[], float], pairs: int) -> dict[str, float]:
    a(), b()
    va, vb = [], []
    for i in range(pairs):
        if i % 2 == 0:
            va.append(a())
            vb.append(b())
        else:
            vb.append(b())
            va.append(a())
    ratios = [y / x for x, y in zip(va, vb, strict=True)]
    return {"ratio": statistics.median(ratios), "plain_s": statistics.median(va), "gated_s": statistics.median(vb),
            "ratios": ratios}  # fmt: skip


def gate_flops(hidden: int, attention_dim: int, prompt_tokens: int, params: int) -> dict[str, float]:
    """Multiply-adds x2 of the gate (O(T d) form) vs the prefill of the backbone (2 * params * T)."""
    gate = 2 * (hidden * attention_dim + 2 * prompt_tokens * hidden + hidden * attention_dim + 3 * attention_dim)
    prefill = 2 * params * prompt_tokens
    return {"gate": float(gate), "prefill": float(prefill), "ratio": gate / prefill}


def training_step_ratio(gated: Any, plain: Any, tok: Any, vocab: int, device: str, pairs: int) -> dict[str, Any]:
    """CASA step (safegate.training's loss) vs a plain PEFT LoRA step with the same LoRA config and batch."""
    from peft import LoraConfig, get_peft_model

    from .objective import casa_loss

    gated.unmerge_adapter()
    gated.train()
    lora = get_peft_model(copy.deepcopy(plain), LoraConfig(r=gated.gate_config.lora_r,
                          lora_alpha=gated.gate_config.lora_alpha, target_modules=gated.arch.lora_target))  # fmt: skip
    lora.train()
    torch.manual_seed(0)
    ids = torch.randint(4, vocab, (8, 128), device=device)
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    prompt = 96  # 96 prompt tokens, the safety token, 31 response tokens; half the rows harmful
    ids[:, prompt] = torch.tensor([gated.safe_token_id, gated.unsafe_token_id] * 4, device=device)
    labels = ids.clone()
    labels[:, : prompt + 1] = -100
    casa_batch = dict(
        batch, labels=labels, prompt_mask=(torch.arange(128, device=device) < prompt).long().expand(8, -1),
        class_labels=torch.tensor([0, 1] * 4, device=device), safety_index=torch.full((8,), prompt - 1, device=device),
    )  # fmt: skip
    opt_plain = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-4)
    opt_gated = torch.optim.AdamW([p for p in gated.parameters() if p.requires_grad], lr=1e-4)

    def plain_step() -> None:
        out = lora(**batch, labels=ids, use_cache=False)
        out.loss.backward()
        opt_plain.step()
        opt_plain.zero_grad()

    def gated_step() -> None:
        loss = casa_loss(gated, casa_batch).loss
        loss.backward()
        opt_gated.step()
        opt_gated.zero_grad()

    result = _paired(plain_step, gated_step, pairs, device)
    gated.eval()
    return result


def _memory(device: str, plain: Any, gated: Any, inputs: dict[str, Any], gen: dict[str, Any]) -> dict[str, Any]:
    """Peak CUDA memory of one generate call (last batch size) above what is resident before it."""
    if not device.startswith("cuda"):
        return {"note": "peak memory is measured on CUDA (torch.cuda.max_memory_allocated) only"}
    peaks = {}
    for name, fn in (("plain", plain.generate), ("gated", gated.generate)):
        torch.cuda.synchronize()
        resident = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            fn(**inputs, **gen)
        torch.cuda.synchronize()
        peaks[name] = torch.cuda.max_memory_allocated() - resident
    return {"plain_peak_extra_bytes": peaks["plain"], "gated_peak_extra_bytes": peaks["gated"],
            "ratio": peaks["gated"] / max(peaks["plain"], 1)}  # fmt: skip


def omni_bundle_bytes(size: str, lora_r: int = 8, attention_dim: int = 256) -> dict[str, Any]:
    """Bytes of a default bundle for the Qwen2.5-Omni thinker of `size` ("3b"/"7b"), counted on the meta device."""
    from transformers import Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration

    from .arch import resolve
    from .config import GateConfig

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


def _machine(device: str) -> dict[str, Any]:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "device": device, "threads": torch.get_num_threads()}  # fmt: skip
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def format_table(results: dict[str, Any]) -> str:
    lines = [f"safegate bench — {results['shape']} on {results['machine']['device']} ({results['dtype']})", ""]
    lines.append(f"{'measurement':<44}{'plain':>10}{'gated':>10}{'ratio':>9}")
    for key, row in results["generate"].items():
        name = f"generate {key} (s)"
        lines.append(f"{name:<44}{row['plain_s']:>10.3f}{row['gated_s']:>10.3f}{row['ratio']:>9.3f}")
    for key, row in results["ttft"].items():
        name = f"time to first answer token {key} (s)"
        lines.append(f"{name:<44}{row['plain_s']:>10.3f}{row['gated_s']:>10.3f}{row['ratio']:>9.3f}")
    step = results["training_step"]
    if "ratio" in step:
        lines.append(f"{'training step vs plain LoRA (s)':<44}{step['plain_s']:>10.3f}{step['gated_s']:>10.3f}"
                     f"{step['ratio']:>9.3f}")  # fmt: skip
    lines.append(f"{'gate FLOPs / prefill FLOPs':<44}{'':>20}{results['flops']['ratio']:>9.2e}")
    if "ratio" in results["memory"]:
        mem = results["memory"]
        name = "peak generate memory above resident (MB)"
        plain_mb, gated_mb = mem["plain_peak_extra_bytes"] / 1e6, mem["gated_peak_extra_bytes"] / 1e6
        lines.append(f"{name:<44}{plain_mb:>10.1f}{gated_mb:>10.1f}{mem['ratio']:>9.3f}")
    for name, b in results["bundle_bytes"].items():
        label = f"bundle bytes, Qwen2.5-Omni-{name.upper()}"
        lines.append(f"{label:<44}{'':>20}{b['total_bytes'] / 1e6:>7.1f}MB")
    return "\n".join(lines)
