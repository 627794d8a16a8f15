"""`safegate.bench.benchmark`: every measurement of the gate's overhead, as ratios gated/plain, in one JSON-able dict.

A random-initialised backbone of realistic shape (`SHAPES`) is measured plain and gated: `generate` and the time to
the first answer token (paired, `bench.timing`) on the benign and harmful paths, the benign path with base answers
(`GateConfig.safe_answer="base"`) and an A/A control, peak memory
(`bench.memory`), counted ops (`bench.op_count`), the training step (`bench.training_step`), FLOPs and bundle bytes
(`bench.costs`). The method and the latest numbers are in docs/performance.md; the command is `bench.cli`.

Example:
    >>> sorted(SHAPES), sorted(VERDICTS)
    (['qwen2.5-0.5b', 'small', 'smollm2-135m', 'tiny'], ['benign', 'harmful'])
"""

from __future__ import annotations

import copy
import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from safegate.bench.costs import OMNI_TEXT, gate_flops, omni_bundle_bytes
from safegate.bench.memory import generate_peak_memory
from safegate.bench.op_count import generate_call_counts
from safegate.bench.timing import paired_generate
from safegate.bench.training_step import training_step_ratio

__all__ = ["BASE_ANSWER", "SHAPES", "VERDICTS", "benchmark"]

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


#: What the gate decides in each measured path: a confident gate (read-out bias) stands in for a trained one.
#: The results also hold a `control` path: the plain model against a copy of itself (the noise floor).
VERDICTS = {"benign": ("safe", -30.0), "harmful": ("unsafe", 30.0)}
#: The benign path with `GateConfig.safe_answer="base"` (the base model answers; one more prefill per call).
BASE_ANSWER = "benign_base_answer"


def benchmark(
    shape: str = "qwen2.5-0.5b",
    pairs: int = 5,
    prompt_tokens: int = 256,
    new_tokens: int = 64,
    batch_sizes: list[int] | None = None,
    device: str = "cpu",
    progress: bool = True,
    ttft_pairs: int | None = None,
    members: int = 1,
) -> dict[str, Any]:
    """Run every measurement and return a JSON-able dict (`progress`: a tqdm bar on stderr).

    `members`: gates in the ensemble (`GateConfig.members`; 1 = the library's default single gate).

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
    gated = safegate.attach(model, tok, safegate.GateConfig(members=members))
    gated.merge_adapter()
    vocab = min(len(tok) - 2, model.config.vocab_size)
    results: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": _commit(),
        "machine": _machine(device),
        "shape": shape,
        "config": SHAPES[shape],
        "members": members,
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
    total = 2 * (len(VERDICTS) + 2) * len(batches) + 2  # generate + first token per path and batch; training
    bar = tqdm(total=total, desc="safegate bench", unit="measurement", disable=not progress)
    for path, (label, bias) in VERDICTS.items():
        with torch.no_grad():
            gated.gate.set_output_bias(bias)
        results["generate"][path], results["ttft"][path] = {}, {}
        for batch, inputs in batches.items():
            with torch.no_grad():
                decided = gated.generate(**inputs, max_new_tokens=1, return_dict_in_generate=True).safety
            if set(decided) != {label}:
                raise RuntimeError(f"the {path} path should decide {label!r}, the gate said {decided}")
            key = f"batch_{batch}"
            bar.set_postfix_str(f"{path}, {key}")
            results["generate"][path][key], results["ttft"][path][key] = paired_generate(
                plain.generate, gated.generate, inputs, gen, (pairs, ttft_pairs), device
            )
            bar.update(2)
    # benign prompts answered by the base model (GateConfig.safe_answer="base": LoRA unmerged, off for safe rows)
    gated.unmerge_adapter()
    gated.gate_config.safe_answer = "base"
    with torch.no_grad():
        gated.gate.set_output_bias(VERDICTS["benign"][1])
    results["generate"][BASE_ANSWER], results["ttft"][BASE_ANSWER] = {}, {}
    for batch, inputs in batches.items():
        key = f"batch_{batch}"
        bar.set_postfix_str(f"{BASE_ANSWER}, {key}")
        results["generate"][BASE_ANSWER][key], results["ttft"][BASE_ANSWER][key] = paired_generate(
            plain.generate, gated.generate, inputs, gen, (pairs, ttft_pairs), device
        )
        bar.update(2)
    gated.gate_config.safe_answer = "adapted"
    gated.merge_adapter()
    # A/A control: the plain model against an identical copy of itself shows how far the machine's noise reaches
    twin = copy.deepcopy(plain)
    results["generate"]["control"], results["ttft"]["control"] = {}, {}
    for batch, inputs in batches.items():
        key = f"batch_{batch}"
        bar.set_postfix_str(f"control, {key}")
        results["generate"]["control"][key], results["ttft"]["control"][key] = paired_generate(
            plain.generate, twin.generate, inputs, gen, (pairs, ttft_pairs), device
        )
        bar.update(2)
    del twin
    with torch.no_grad():
        gated.gate.set_output_bias(VERDICTS["benign"][1])
    results["memory"] = generate_peak_memory(device, plain, gated, batches[max(batches)], gen)
    smallest = min(batches)
    results["calls"] = {"batch": smallest}
    for name, fn in (("plain", plain.generate), ("gated", gated.generate)):
        results["calls"][name] = generate_call_counts(fn, batches[smallest])
    results["flops"] = gate_flops(model.config.hidden_size, gated.gate_config.attention_dim, prompt_tokens,
                                  sum(p.numel() for p in plain.parameters()), members=members)  # fmt: skip
    results["training_step"] = {}
    for prompt in (96, 16):
        key = f"prompt_{prompt}_response_{128 - prompt}"
        bar.set_postfix_str(f"training step, {key}")
        results["training_step"][key] = training_step_ratio(gated, plain, vocab, device, pairs, prompt)
        bar.update()
    bar.close()
    results["bundle_bytes"] = {name: omni_bundle_bytes(name) for name in OMNI_TEXT}
    return results


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
