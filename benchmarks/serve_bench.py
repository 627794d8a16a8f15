"""Gated vs plain vLLM serving: throughput and time to first token, paired and interleaved (`docs/serving-vllm.md`).

Starts two OpenAI-compatible servers on the same merged export, on 127.0.0.1 only: `safegate serve` (the gate) and
vLLM's plain API server. Each round sends CONCURRENCY streaming `/v1/completions` requests with distinct chat
prompts of PROMPT_TOKENS token ids and `max_tokens=NEW_TOKENS` (`ignore_eos`: every answer has that length) to one
server, then the same to the other (the order alternates per round). Reported: per round the ratio gated/plain of
the wall time (1/throughput) and of the median time to first token; medians over the rounds; raw numbers as JSON.

    .venv-serve/bin/python benchmarks/serve_bench.py EXPORT [--rounds 3] [--concurrency 32] [--cores 1] [--two-pass]
        [--out F]

The gated server decides one-pass (`serving.one_pass`) unless `--two-pass`; every gated response must carry its
verdict (counted in the results).

Run it in `.venv-serve` (`make serve-setup`) on a `save_merged` export (it holds the `model.safetensors.index.json`
vLLM needs; `safegate.serving.write_weights_index` adds it to an older one).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from transformers import AutoTokenizer

HOST = "127.0.0.1"


def prompts(export: str, count: int, length: int, salt: str) -> list[list[int]]:
    """`count` distinct chat prompts of exactly `length` ids: the template around a user message of filler ids."""
    tok = AutoTokenizer.from_pretrained(export)
    mark = "\x00MARK\x00"
    rendered = tok.apply_chat_template([{"role": "user", "content": mark}], tokenize=False, add_generation_prompt=True)
    pre, post = (tok(part, add_special_tokens=False)["input_ids"] for part in rendered.split(mark))
    room = length - len(pre) - len(post)
    out = []
    for i in range(count):
        words = f"Request {salt}-{i}. " + " ".join(f"word{j % 97}" for j in range(2 * length))
        out.append(pre + tok(words, add_special_tokens=False)["input_ids"][:room] + post)
    return out


def start(gated: bool, export: str, port: int, cores: str, log: Path, two_pass: bool = False) -> subprocess.Popen:
    env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND=cores, VLLM_CPU_KVCACHE_SPACE="2", HF_HUB_OFFLINE="1")
    env.pop("VLLM_PLUGINS", None)
    flags = ["--host", HOST, "--port", str(port), "--enforce-eager", "--max-model-len", "1024", "--max-num-seqs", "64"]
    flags += ["--dtype", os.environ.get("SERVE_BENCH_DTYPE", "bfloat16"), "--disable-uvicorn-access-log"]
    if gated:
        cmd = [sys.executable, "-m", "safegate", "serve", export, *(["--two-pass"] if two_pass else []), *flags]
    else:
        cmd = [sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry", "--model", export, *flags]
    return subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


async def wait_healthy(port: int, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the server on port {port} exited with {proc.returncode}")
            try:
                if (await client.get(f"http://{HOST}:{port}/health")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(2)
    raise TimeoutError(f"the server on port {port} did not become healthy in {timeout} s")


async def one(client: httpx.AsyncClient, port: int, model: str, ids: list[int], new: int) -> tuple[float, int, Any]:
    """(time to first token, tokens received, the `safegate` field or None) for one streaming completion."""
    body = {"model": model, "prompt": ids, "max_tokens": new, "ignore_eos": True, "temperature": 0, "stream": True}
    start_t, first, chunks, verdict = time.perf_counter(), None, 0, None
    async with client.stream("POST", f"http://{HOST}:{port}/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"port {port}: HTTP {response.status_code}: {await response.aread()!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            body = json.loads(line[6:])
            verdict = verdict or body.get("safegate")
            if body["choices"][0].get("text"):
                first = first if first is not None else time.perf_counter() - start_t
                chunks += 1
    return first if first is not None else float("nan"), chunks, verdict


async def round_trip(port: int, model: str, batch: list[list[int]], new: int) -> dict:
    async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=len(batch))) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(client, port, model, ids, new) for ids in batch))
        wall = time.perf_counter() - t0
    ttft = [r[0] for r in results]
    chunks = [r[1] for r in results]
    verdicts = [r[2][0]["verdict"] if r[2] else None for r in results]
    return {"wall_s": wall, "ttft_median_s": statistics.median(ttft), "ttft_s": ttft, "chunks": chunks,
            "verdicts": verdicts}  # fmt: skip


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--cores", default="1", help="VLLM_CPU_OMP_THREADS_BIND of both servers (one core by default)")
    parser.add_argument("--two-pass", action="store_true", help="the gated server decides with a pooling pass first")
    parser.add_argument("--out", default="serve-bench-out/results.json")
    args = parser.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    ports = {"gated": 8231, "plain": 8232}
    procs = {name: start(name == "gated", args.export, port, args.cores, out.parent / f"{name}.log", args.two_pass)
             for name, port in ports.items()}  # fmt: skip
    try:
        for name, port in ports.items():
            await wait_healthy(port, procs[name])
        warm = prompts(args.export, 2, args.prompt_tokens, "warm")
        for port in ports.values():
            await round_trip(port, args.export, warm, 4)
        rounds = []
        for r in range(args.rounds):
            order = ["gated", "plain"] if r % 2 == 0 else ["plain", "gated"]
            rec = {}
            for name in order:  # distinct prompts per server too, so no prefix cache helps either
                tagged = prompts(args.export, args.concurrency, args.prompt_tokens, f"r{r}-{name}")
                rec[name] = await round_trip(ports[name], args.export, tagged, args.new_tokens)
            if None in rec["gated"]["verdicts"] or any(rec["plain"]["verdicts"]):
                raise RuntimeError("a gated response without its verdict (or a plain one with one)")
            rec["wall_ratio"] = rec["gated"]["wall_s"] / rec["plain"]["wall_s"]
            rec["ttft_ratio"] = rec["gated"]["ttft_median_s"] / rec["plain"]["ttft_median_s"]
            rounds.append(rec)
            print(
                f"round {r}: wall gated/plain {rec['wall_ratio']:.3f} ({rec['gated']['wall_s']:.1f}/"
                f"{rec['plain']['wall_s']:.1f} s), median TTFT ratio {rec['ttft_ratio']:.3f} "
                f"({rec['gated']['ttft_median_s']:.2f}/{rec['plain']['ttft_median_s']:.2f} s)",
                flush=True,
            )
        path = "two-pass" if args.two_pass else "one-pass"
        summary = {
            "setup": vars(args) | {"dtype": os.environ.get("SERVE_BENCH_DTYPE", "bfloat16"), "gated_path": path},
            "throughput_ratio_gated_over_plain": statistics.median(1 / r["wall_ratio"] for r in rounds),
            "ttft_ratio_gated_over_plain": statistics.median(r["ttft_ratio"] for r in rounds),
            "rounds": rounds,
        }
        out.write_text(json.dumps(summary, indent=1))
        print(
            f"throughput gated/plain {summary['throughput_ratio_gated_over_plain']:.3f}, "
            f"TTFT gated/plain {summary['ttft_ratio_gated_over_plain']:.3f}; {out}"
        )
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    asyncio.run(main())
