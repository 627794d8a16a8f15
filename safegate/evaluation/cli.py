"""`safegate eval`: base vs gated model on harmful and benign prompts under attacks; report.json/.md and plots.

Everything the user passes is validated before the model loads (data files line by line, attack and judge
names, the judge's endpoint, the output folder); a problem ends the command with one line on stderr and exit
status 2, and DIR is left as it was. The plots need matplotlib (`pip install 'safegate[eval]'`); without it the
command stops before loading the model unless `--no-plots` is given. The results are written before the plots,
so a plot that fails costs only the plots.

Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser(prog="safegate")
    >>> register(parser.add_subparsers())
    >>> args = parser.parse_args(["eval", "--model", "tiny:qwen2", "--data", "a.jsonl", "--out", "rep"])
    >>> args.attacks, args.defense, args.max_new_tokens
    ('none', 'casa', 64)
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

EPILOG = """examples:
  safegate eval --model demo-out/model --bundle demo-out/bundle --data harmful.jsonl --data xstest.jsonl \\
                --out demo-out/report --attacks none,prefill,template
  safegate eval --model tiny:qwen2 --data prompts.jsonl --out /tmp/report --judge refusal --limit 20

The judge measures refusal, not harm. See docs/evaluation.md."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="attack success rate and over-refusal, base vs gated model, with a report",
        description="Evaluate a gated model against its own base model on JSONL prompts (record format: "
        '{"prompt": ..., "label": "safe"|"unsafe"}) under attacks; write report.json, report.md and plots.',
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="local folder, Hub id, tiny:<arch> or builtin:<name>")
    parser.add_argument("--bundle", help="safegate bundle (folder or Hub id); without it an untrained gate is used")
    parser.add_argument(
        "--data", required=True, action="append", metavar="[NAME=]FILE.jsonl", help="repeatable; NAME labels the rows"
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="report folder (written atomically)")
    parser.add_argument(
        "--attacks", default="none", help="comma list of none,prefill,template,injection,typographic,spoken "
        "(prefill = 2,4,9,12 tokens; prefill:K for one length); default: none",
    )  # fmt: skip
    parser.add_argument(
        "--judge", default=None, help="refusal | classifier | hf:MODEL | openai:URL[#MODEL] "
        "(default: classifier when installed, else refusal)",
    )  # fmt: skip
    parser.add_argument("--limit", type=int, help="seeded random subset of N records per data file")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument(
        "--defense",
        default="casa",
        help="casa (default), a registered defense (none, safecode, safesteer) or module:factory",
    )
    parser.add_argument("--templates", metavar="FILE.jsonl", help="jailbreak templates with a {{ prompt }} slot")
    parser.add_argument("--template-max-chars", type=int, help="skip templates longer than this")
    parser.add_argument("--attack-benign", action="store_true", help="also attack benign requests")
    parser.add_argument("--threshold", type=float, help="gate p(unsafe) threshold (default: the gate's own)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples per interval")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "auto"])
    parser.add_argument("--device", help="e.g. cpu, cuda, cuda:1 (default: where the model loads)")
    parser.add_argument(
        "--no-plots", action="store_true", help="skip the PNG plots (they need: pip install 'safegate[eval]')"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def _positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value}.")


def run(args: argparse.Namespace) -> int:
    from safegate.errors import CLIError
    from safegate.evaluation.attacks import parse_attacks
    from safegate.evaluation.data import load_datasets
    from safegate.evaluation.defense import get_defense_factory
    from safegate.evaluation.harness import evaluate
    from safegate.evaluation.judges import get_judge
    from safegate.evaluation.report import check_out_dir, summary_table

    # 1. validate every input before loading anything heavy
    for name in ("--limit", "--batch-size", "--max-new-tokens", "--n-boot"):
        _positive(name, getattr(args, name[2:].replace("-", "_")))
    datasets = load_datasets(args.data)
    attacks = parse_attacks(args.attacks, args.templates, args.template_max_chars, args.attack_benign)
    judge = get_judge(args.judge)
    factory = get_defense_factory(args.defense)
    check_out_dir(args.out)
    if not args.no_plots:  # an optional dependency is checked before the model loads, not after generation
        from safegate.evaluation.plots import check_plot_dependencies

        try:
            check_plot_dependencies("--no-plots")
        except ImportError as err:
            raise CLIError(str(err)) from None
    judge.check()

    # 2. model, defense, evaluation
    say = (
        (lambda message: None) if args.quiet else (lambda message: print(f"safegate eval: {message}", file=sys.stderr))
    )
    say(f"loading {args.model}")
    model, processor = _load(args.model, args.dtype, args.device, CLIError)
    try:
        defense = factory(model, processor, args.bundle)
    except OSError as err:
        raise CLIError(f"--bundle {args.bundle!r}: cannot load ({_line(err)}).") from None
    for note in defense.notes:
        say(f"warning: {note}")
    report = evaluate(
        defense, datasets, attacks, judge, args.out, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
        limit=args.limit, seed=args.seed, n_boot=args.n_boot, threshold=args.threshold,
        attack_benign=args.attack_benign, plots=not args.no_plots, progress=not args.quiet, model_name=args.model,
        bundle=args.bundle, on_progress=say, templates=args.templates, template_max_chars=args.template_max_chars,
    )  # fmt: skip
    print(summary_table(report))
    print(f"report: {args.out}/report.md")
    return 0


def _load(name: str, dtype: str | None, device: str | None, error: type[Exception]) -> tuple[Any, Any]:
    from safegate.backbones.load import load_model

    try:
        return load_model(name, dtype=dtype, device=device)
    except OSError as err:
        raise error(f"--model {name!r}: cannot load ({_line(err)}).") from None


def _line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__
