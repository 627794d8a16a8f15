"""`safegate` command line: one subcommand per module, each exposing `register(subparsers)`.

Example:
    >>> build_parser().prog
    'safegate'
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from safegate.errors import CLIError

# subcommand -> module defining `register(subparsers)`; the parser built there sets `func(args) -> int`.
COMMANDS = {
    "demo": "safegate.demo",
    "train": "safegate.training.cli",
    "eval": "safegate.evaluation.cli",
    "export": "safegate.hub.cli",
    "info": "safegate.hub.cli",
    "bench": "safegate.bench.cli",
    "serve": "safegate.serving.cli",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="safegate", description="CASA safety gates for Hugging Face models.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    registered = set()
    for module_name in dict.fromkeys(COMMANDS.values()):
        if importlib.util.find_spec(module_name.rsplit(".", 1)[0]) is None:
            continue
        try:
            spec = importlib.util.find_spec(module_name)
        except ModuleNotFoundError:
            spec = None
        if spec is None or module_name in registered:
            continue
        importlib.import_module(module_name).register(subparsers)
        registered.add(module_name)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (CLIError, ValueError, FileNotFoundError, KeyError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"safegate {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"safegate {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
