"""Verdicts and greedy answers of vLLM (`GatedLLM`) against the transformers path, on held-out prompts.

    .venv-serve/bin/python benchmarks/serve_agreement.py --bundle demo-out/bundle --data demo-out/data

The issue-18 targets (docs/serving-vllm.md): verdicts equal on >= 99 % of 300 held-out prompts, greedy answers
(first 40 tokens) equal on >= 95 %. Steps:

1. Prompts: every held-out file of `make demo`'s data folder (`heldout_*.jsonl`, `calibration.jsonl`: none of them
   trained on), topped up to `--n` with Do-Not-Answer questions the demo did not train on (drawn by hash); a leak
   check against `train.jsonl` runs first. Each is one user turn in the model's chat template.
2. The bundle on transformers (float32), answers after `<|safe|>` by the adapted model (`safe_answer="adapted"`: what
   one merged set of weights holds; a bundle trained with `safe_answer: base` is served with `--adapted-answers`).
   Its merged export is written (`save_merged`).
3. Reference, batch 1, greedy, `--new-tokens` tokens: `gated.generate` of the bundle (`--reference export`: of the
   export loaded back with `safegate.load_merged`, the same weights as vLLM's; `both`: both, and each other).
4. vLLM: `GatedLLM` on the export (`--dtype`, eager), the same prompts in one batch; one-pass (`serving.one_pass`)
   unless `--two-pass`.

Writes `--out`/results.json (every prompt's verdicts, p(unsafe) and answer ids) and report.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

import safegate
from safegate.data.leakage import check_disjoint, normalise_prompt
from safegate.data.records import load_records
from safegate.data.sources import load_named_set
from safegate.demo_report import git_commit

ROOT = Path(__file__).resolve().parents[1]

HELD_OUT = ["heldout_harmful.jsonl", "heldout_untrained.jsonl", "heldout_xstest.jsonl", "heldout_alpaca.jsonl",
            "calibration.jsonl"]  # fmt: skip


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default="demo-out/bundle", help="bundle folder (`make demo` writes demo-out/bundle)")
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct", help="the bundle's backbone")
    ap.add_argument("--data", default="demo-out/data", help="`make demo`'s data folder (held-out files, train.jsonl)")
    ap.add_argument("--n", type=int, default=300, help="number of prompts")
    ap.add_argument("--new-tokens", type=int, default=40, help="greedy answer tokens compared")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="vLLM's dtype")
    ap.add_argument(
        "--reference",
        choices=["bundle", "export", "both"],
        default="bundle",
        help="transformers reference: the bundle (LoRA unmerged: the target's), the export loaded back, or both",
    )
    ap.add_argument("--two-pass", action="store_true", help="vLLM decides with a pooling pass first (not one-pass)")
    ap.add_argument("--out", default="serve-agreement-out", help="output folder")
    args = ap.parse_args(argv)
    for name in ("bundle", "data"):
        if not Path(getattr(args, name)).is_dir():
            ap.error(f"--{name} {getattr(args, name)!r} is not a folder; run `make demo` first (it writes demo-out/)")
    if args.n < 1 or args.new_tokens < 1:
        ap.error(f"--n and --new-tokens must be >= 1, got {args.n} and {args.new_tokens}")
    return args


def held_out_prompts(data: Path, n: int) -> list[dict[str, Any]]:
    """The demo's held-out prompts, topped up with untrained Do-Not-Answer questions; checked against training."""
    records, seen = [], set()
    for name in HELD_OUT:
        for r in load_records(data / name, require_response=False):
            key = normalise_prompt(r["prompt"])
            if key not in seen:
                seen.add(key)
                records.append({"prompt": r["prompt"], "label": r["label"], "set": name.removesuffix(".jsonl")})
    train = load_records(data / "train.jsonl", require_response=False)
    trained = {normalise_prompt(r["prompt"]) for r in train}
    extra = [r for r in load_named_set("do_not_answer") if normalise_prompt(r["prompt"]) not in trained | seen]
    extra.sort(key=lambda r: hashlib.sha256(r["prompt"].encode()).digest())
    records += [{"prompt": r["prompt"], "label": "unsafe", "set": "do_not_answer_untrained"} for r in extra]
    records = records[:n]
    check_disjoint(train, records)  # raises LeakageError naming any prompt that was trained on
    return records


def transformers_answers(gated: Any, tok: Any, prompts: list[str], new_tokens: int) -> list[dict[str, Any]]:
    from tqdm.auto import tqdm

    out = []
    for prompt in tqdm(prompts, desc="transformers", leave=False):
        enc = tok([prompt], return_tensors="pt")
        with torch.no_grad():
            gen = gated.generate(**enc, max_new_tokens=new_tokens, do_sample=False, return_dict_in_generate=True)
        ids = gen.sequences[0, enc["input_ids"].shape[1] :].tolist()
        out.append({"verdict": gen.safety[0], "p_unsafe": float(gen.safety_scores[0]), "ids": ids})
    return out


def eos_ids(tok: Any, model: Any) -> set[int]:
    """The ids that end an answer: the tokenizer's and the generation config's."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = ids if isinstance(ids, list) else [ids]
    return {i for i in [tok.eos_token_id, *ids] if i is not None}


def strip_eos(ids: list[int], eos: set[int]) -> list[int]:
    """Answer ids up to (without) the first end-of-sequence id: both engines stop there, one may keep it."""
    for i, token in enumerate(ids):
        if token in eos:
            return ids[:i]
    return ids


def compare(test: list[dict[str, Any]], ref: list[dict[str, Any]], eos: set[int], n: int) -> dict[str, Any]:
    verdicts = sum(a["verdict"] == b["verdict"] for a, b in zip(test, ref))
    answers = sum(strip_eos(a["ids"], eos)[:n] == strip_eos(b["ids"], eos)[:n] for a, b in zip(test, ref))
    delta = sorted(abs(a["p_unsafe"] - b["p_unsafe"]) for a, b in zip(test, ref))
    flips = [
        {"index": i, "p_unsafe": [a["p_unsafe"], b["p_unsafe"]]}
        for i, (a, b) in enumerate(zip(test, ref))
        if a["verdict"] != b["verdict"]
    ]
    return {"n": len(ref), "verdicts_equal": verdicts, "answers_equal": answers, "max_delta_p": delta[-1],
            "median_delta_p": delta[len(delta) // 2], "verdict_flips": flips}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = held_out_prompts(Path(args.data), args.n)
    model, tok = safegate.load_model(args.model, dtype="float32")
    eos = eos_ids(tok, model)
    gated = safegate.load_bundle(model, tok, args.bundle).eval()
    trained_answer = gated.gate_config.safe_answer
    gated.gate_config.safe_answer = "adapted"
    export = gated.save_merged(out / "export")
    prompts = [tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False,
                                       add_generation_prompt=True) for r in records]  # fmt: skip
    timing: dict[str, float] = {}
    refs: dict[str, list[dict[str, Any]]] = {}
    if args.reference in ("bundle", "both"):
        at = time.perf_counter()
        refs["bundle"] = transformers_answers(gated, tok, prompts, args.new_tokens)
        timing["transformers_bundle_s"] = time.perf_counter() - at
    del gated, model
    if args.reference in ("export", "both"):
        loaded, loaded_tok = safegate.load_merged(export, dtype="float32")
        at = time.perf_counter()
        refs["export"] = transformers_answers(loaded.eval(), loaded_tok, prompts, args.new_tokens)
        timing["transformers_export_s"] = time.perf_counter() - at
        del loaded

    from vllm import SamplingParams

    from safegate.serving import GatedLLM

    at = time.perf_counter()
    llm = GatedLLM(export, one_pass=not args.two_pass, dtype=args.dtype, enforce_eager=True, max_model_len=2048,
                   max_num_seqs=32)  # fmt: skip
    timing["vllm_start_s"] = time.perf_counter() - at
    at = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(max_tokens=args.new_tokens, temperature=0))
    timing["vllm_generate_s"] = time.perf_counter() - at
    served = [{"verdict": o.verdict, "p_unsafe": o.p_unsafe, "ids": list(o.request_output.outputs[0].token_ids)}
              for o in outs]  # fmt: skip
    comparisons = {f"vs_{name}": compare(served, ref, eos, args.new_tokens) for name, ref in refs.items()}
    if len(refs) == 2:
        comparisons["export_vs_bundle"] = compare(refs["export"], refs["bundle"], eos, args.new_tokens)
    report = {
        **comparisons,
        "unsafe_verdicts": {"vllm": sum(o["verdict"] == "unsafe" for o in served), "n": len(served)},
        "sets": {s: sum(r["set"] == s for r in records) for s in dict.fromkeys(r["set"] for r in records)},
        "meta": {
            "bundle": args.bundle,
            "model": args.model,
            "trained_safe_answer": trained_answer,
            "vllm_dtype": args.dtype,
            "vllm_path": "two-pass" if args.two_pass else "one-pass",
            "new_tokens": args.new_tokens,
            "commit": git_commit(ROOT),
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "timing": timing,
            "seconds": time.perf_counter() - started,
        },  # fmt: skip
        "prompts": [
            {**r, "vllm": s, **{name: ref[i] for name, ref in refs.items()}}
            for i, (r, s) in enumerate(zip(records, served))
        ],  # fmt: skip
    }
    (out / "results.json").write_text(json.dumps(report, indent=1))
    path = "two-pass" if args.two_pass else "one-pass"
    head = f"| vLLM ({args.dtype}, {path}) vs | verdicts equal | answers equal (first {args.new_tokens} tokens) |"
    lines = [head + " max / median Δ p(unsafe) |", "|---|---|---|---|"]
    for key, title in [("vs_bundle", "the bundle on transformers"), ("vs_export", "the export on transformers"),
                       ("export_vs_bundle", "(export vs bundle, both transformers)")]:  # fmt: skip
        if key not in report:
            continue
        c = report[key]
        lines.append(f"| {title} | {c['verdicts_equal']}/{c['n']} | {c['answers_equal']}/{c['n']} | "
                     f"{c['max_delta_p']:.2g} / {c['median_delta_p']:.2g} |")  # fmt: skip
    lines.append(f"\nPrompts: {report['sets']}; unsafe verdicts (vLLM) {report['unsafe_verdicts']['vllm']}. "
                 f"Commit {report['meta']['commit']}, {report['meta']['seconds']:.0f} s.")  # fmt: skip
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":  # vLLM starts its engines in spawned processes
    sys.exit(main())
