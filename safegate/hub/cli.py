"""`safegate export` and `safegate info`: write, re-export, push and inspect gate bundles; sizes in bytes.

    safegate info BUNDLE [--revision REV] [--cache-dir DIR] [--json]
    safegate export --model NAME --bundle-out DIR                 # fresh (untrained) gate: size of a bundle
    safegate export --from-bundle SRC --model NAME --bundle-out DIR   # check SRC fits NAME, re-export it
    safegate export --from-bundle SRC --bundle-out DIR            # verified copy (e.g. Hub repo -> folder)
    safegate export [--from-bundle SRC] --model NAME --merged DIR  # plain checkpoint, LoRA merged, + the gate
    ... [--push-to-hub REPO_ID [--private]] [--threshold P] [--recipe NAME]

Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser(prog="safegate")
    >>> register(parser.add_subparsers(dest="command"))
    >>> parser.parse_args(["info", "my-gate"]).func is run_info
    True
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from safegate.errors import CLIError
from safegate.hub.bundle import SafeGateBundle
from safegate.hub.files import bundle_sizes, resolve_bundle
from safegate.modeling.model import SafeGateModel


def register(subparsers: Any) -> None:
    """Add the `export` and `info` subcommands."""
    info = subparsers.add_parser(
        "info", help="show a bundle's config summary and its size in bytes",
        description="Validate a gate bundle (folder or Hub repo id) and print its summary and file sizes in bytes.",
    )  # fmt: skip
    info.add_argument("bundle", help="bundle folder or Hub repo id")
    _add_hub_options(info)
    info.add_argument("--json", action="store_true", help="print the config and sizes as JSON")
    info.set_defaults(func=run_info)

    export = subparsers.add_parser(
        "export", help="write (or re-export) a gate bundle or a merged checkpoint and report sizes in bytes",
        description="Write a gate bundle. With --from-bundle, the source bundle is validated (and, with --model, "
        "loaded strictly onto that backbone) and written again; without it, a fresh untrained gate is attached "
        "to --model, which shows the bundle size for that backbone. --merged DIR writes the gated --model as a "
        "plain transformers checkpoint (LoRA merged, safety tokens in) plus the gate, for engines such as vLLM.",
    )  # fmt: skip
    export.add_argument("--model", help="backbone: folder, Hub id, tiny:qwen2, tiny:llama or builtin:<name>")
    export.add_argument("--from-bundle", metavar="SRC", help="bundle folder or Hub repo id to re-export")
    export.add_argument("--bundle-out", metavar="DIR", help="folder to write (atomically)")
    export.add_argument(
        "--merged", metavar="DIR",
        help="also write a merged export to DIR (atomically): a plain transformers checkpoint with LoRA merged and "
        "the safety tokens in, plus the gate; needs --model (docs/serving.md)",
    )  # fmt: skip
    export.add_argument(
        "--adapted-answers", action="store_true",
        help="with --merged, for a gate whose safe answers come from the base model (GateConfig.safe_answer="
        "'base'): export the adapted model's answers after <|safe|> instead, which is what merged weights hold",
    )  # fmt: skip
    export.add_argument("--push-to-hub", metavar="REPO_ID", help="also upload the bundle to this Hub repo")
    export.add_argument("--private", action="store_true", help="create the Hub repo as private")
    export.add_argument("--threshold", type=float, help="set the default p(unsafe) threshold of the gate")
    export.add_argument("--recipe", help="recipe name to record (default: the source bundle's)")
    export.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "auto"], help="backbone dtype")
    export.add_argument("--lora-r", type=int, default=8, help="LoRA rank of a fresh gate (default 8)")
    export.add_argument("--attention-dim", type=int, default=256, help="attention width of a fresh gate")
    _add_hub_options(export)
    export.set_defaults(func=run_export)


def _add_hub_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--revision", help="Hub revision (branch, tag or commit) of a repo id")
    parser.add_argument("--cache-dir", help="Hugging Face Hub cache folder")


def run_info(args: argparse.Namespace) -> int:
    folder = resolve_bundle(args.bundle, args.revision, cache_dir=args.cache_dir)
    bundle = SafeGateBundle.from_pretrained(folder)  # validates every file
    sizes = bundle_sizes(folder)
    if args.json:
        print(json.dumps({"path": str(folder), "config": bundle.config, "sizes": sizes}, indent=2))
        return 0
    c, b, g = bundle.config, bundle.backbone, bundle.gate_config  # optional fields may be absent (`hub.schema`)
    gated = f" (gated: {b['gated_module']} = {b['gated_model_type']})" if b.get("gated_module") else ""
    writers = ", ".join(f"{k} {v}" for k, v in (c.get("versions") or {}).items()) or "(not recorded)"
    rows_gated = f"{b['vocab_rows_gated']} with the tokens" if "vocab_rows_gated" in b else "gated rows not recorded"
    lines = [
        f"bundle: {folder}",
        f"schema_version: {c['schema_version']}  written by {writers}",
        f"backbone: {b['name_or_path'] or '(name not recorded)'}  model_type={b['model_type']}{gated}",
        f"  hidden_size={b['hidden_size']} num_layers={b['num_layers']} vocab_rows={b['vocab_rows']} "
        f"({rows_gated}) {'tied' if b['tied'] else 'untied'} head, dtype={b.get('dtype', '(not recorded)')}",
        f"tokens: safe={g.safe_token!r} unsafe={g.unsafe_token!r}",
        f"gate: attention_dim={g.attention_dim} aggregation={g.aggregation} scaling={g.scaling} layer={g.layer} "
        f"train_query={g.train_query} members={g.members}",
        f"lora: r={g.lora_r} alpha={g.lora_alpha} dropout={g.lora_dropout} "
        f"target={getattr(bundle.adapter_config, 'target_modules', None)}",
        f"threshold: {'argmax of the gated pair' if g.threshold is None else g.threshold}",
        f"recipe: {c.get('recipe') or '(not recorded)'}",
    ]
    for row in c.get("evaluation") or []:
        lines.append("evaluation: " + ", ".join(f"{k}={v}" for k, v in row.items()))
    print("\n".join(lines))
    _print_sizes(sizes, bundle)
    return 0


def run_export(args: argparse.Namespace) -> int:
    if not args.bundle_out and not args.push_to_hub and not args.merged:
        raise CLIError("give --bundle-out DIR, --merged DIR and/or --push-to-hub REPO_ID.")
    if not args.model and not args.from_bundle:
        raise CLIError("give --model NAME (fresh gate or target backbone) and/or --from-bundle SRC.")
    if args.merged and not args.model:
        raise CLIError(
            f"--merged {args.merged} needs --model NAME: the backbone LoRA and the token rows are merged into "
            "(with --from-bundle SRC, the backbone SRC was trained for)."
        )
    source = None
    if args.from_bundle:
        source = SafeGateBundle.from_pretrained(args.from_bundle, revision=args.revision, cache_dir=args.cache_dir)
    recipe = args.recipe if args.recipe is not None else (source.config.get("recipe") if source else None)
    evaluation = source.config.get("evaluation") if source else None
    gated = _gated_from_model(args, source) if args.model else None
    if gated is not None:
        bundle = SafeGateBundle.from_model(gated, recipe=recipe, evaluation=evaluation)
    else:
        assert source is not None
        bundle = _with_metadata(source, recipe, args.threshold)
    if args.bundle_out:
        bundle.save_pretrained(args.bundle_out)
        print(f"wrote bundle to {args.bundle_out}")
        _print_sizes(bundle_sizes(args.bundle_out), bundle)
    if args.merged:
        assert gated is not None
        if gated.gate_config.safe_answer != "adapted":
            if not args.adapted_answers:
                raise CLIError(
                    f"--merged {args.merged}: this gate answers safe prompts with the base model "
                    f"(safe_answer={gated.gate_config.safe_answer!r}), which one merged set of weights cannot hold. "
                    "Add --adapted-answers to export the adapted model's answers after <|safe|> (verdicts and "
                    "refusals unchanged), or serve it with transformers (`load_bundle`)."
                )
            gated.gate_config.safe_answer = "adapted"
        folder = gated.save_merged(args.merged)
        sizes = {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
        print(f"wrote merged export (plain transformers checkpoint + gate) to {folder}")
        _print_sizes(sizes, None)
    if args.push_to_hub:
        url = bundle.push_to_hub(args.push_to_hub, private=args.private or None, commit_message="Upload a gate bundle")
        print(f"pushed to {args.push_to_hub}: {url}")
    return 0


def _gated_from_model(args: argparse.Namespace, source: SafeGateBundle | None) -> SafeGateModel:
    import safegate
    from safegate.backbones.load import load_model

    model, processor = load_model(args.model, dtype=args.dtype)
    if source is not None:
        gated = source.attach(model, processor)  # strict: refuses a backbone the bundle was not trained for
    else:
        config = safegate.GateConfig(lora_r=args.lora_r, attention_dim=args.attention_dim)
        gated = safegate.attach(model, processor, config)
        print("note: exporting a fresh, untrained gate (train one with `safegate train`).")
    if args.threshold is not None:
        gated.gate_config.threshold = _threshold(args.threshold)
    return gated


def _with_metadata(bundle: SafeGateBundle, recipe: str | None, threshold: float | None) -> SafeGateBundle:
    config = dict(bundle.config, recipe=recipe)
    if threshold is not None:
        config["threshold"] = _threshold(threshold)
        config["gate_config"] = dict(config["gate_config"], threshold=config["threshold"])
    return SafeGateBundle(config, bundle.tensors, bundle.adapter_config, bundle.adapter_tensors)


def _threshold(value: float) -> float:
    from safegate.modeling.config import check_threshold

    checked = check_threshold(value, "--threshold")
    assert checked is not None
    return checked


def _print_sizes(sizes: dict[str, int], bundle: SafeGateBundle | None) -> None:
    width = max(len(name) for name in sizes) + 2
    print("files (bytes):")
    for name, size in sizes.items():
        print(f"  {name:<{width}}{size:>12}")
    print(f"  {'total':<{width}}{sum(sizes.values()):>12}")
    if bundle is None:
        return
    n_tensors = len(bundle.tensors) + len(bundle.adapter_tensors)
    print(f"tensors: {n_tensors}, tensor data {bundle.payload_bytes} bytes")
