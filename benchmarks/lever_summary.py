"""Every measured lever against the left-out-source target, in one table and one picture.

`benchmarks/generalization.py` (one run per lever) and `benchmarks/layer_probe.py` (the frozen backbone's
read-out ceilings) leave their numbers in `results.json` files under `docs/generalization/`. This script reads
those files, nothing else: per run and left-out source, the gate AUROC against all held-out benign prompts and
against XSTest's safe look-alikes (half B), mean ± sample std over the run's seeds, beside the issue's target
(0.95 on every left-out source). Runs that train on half of the left-out source (`--in-source 0.5`, the probes'
in-source fold) are *controls*: they bound what any read-out of the backbone's states reaches in distribution.

    python benchmarks/lever_summary.py --out docs/generalization/levers-summary
    python benchmarks/lever_summary.py --run "my lever=/tmp/gen/results.json" --out /tmp/summary

Writes `levers.md` (the table), `levers.json` (every number, with each run's commit) and `levers.png` (both
panels; needs matplotlib). A probe file contributes its best layer per source, picked in hindsight (the ceiling
is optimistic by construction; one split, so no spread), and its best MLP read-out (mean ± std over its seeds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "generalization"
SOURCES = ("advbench", "harmbench", "do_not_answer", "xstest_unsafe")
METRICS = ("auroc", "auroc_vs_xstest_safe_b")
TARGET = 0.95

#: The documented full-set runs (3 seeds each, SmolLM2-135M-Instruct unless named): label, file under DOCS.
LEVERS = (
    ("default gate", "full/results_gate.json"),
    ("five gates (the demo's)", "full/results_members5.json"),
    ("weight decay 0.1", "full/results_wd0.1.json"),
    ("weight decay 1.0", "full/results_wd1.json"),
    ("attention dim 32", "full/results_dim32.json"),
    ("gate at layer 15", "full/results_layer15.json"),
    ("gate at layer 17", "full/results_layer17.json"),
    ("phrasing augmentation 0.5", "full/results_aug0.5.json"),
    ("token rows only", "full/results_rows.json"),
    ("gate + token rows", "full/results_both.json"),
    ("+1,419 harmful questions (tense)", "full/results_tense.json"),
    ("safety system prompt", "full/results_safety_prompt.json"),
    ("LoRA on the verdict, 250 steps", "full/results_lora250_xstest_unsafe.json"),
    ("LoRA on the verdict, lr 1e-4", "full/results_lora250_lr1e-4_xstest_unsafe.json"),
    ("Gemma 3 270M, layer 10", "gemma3-270m/gate/results.json"),
    ("Gemma 3 270M, final norm", "gemma3-270m/gate-final-norm/results.json"),
    ("linear probe, best layer (hindsight)", "probe/results.json"),
    ("MLP read-out, best (hindsight)", "probe/results.json#mlp"),
)
#: Half of the left-out source trained on: what the states allow in distribution.
CONTROLS = (
    ("control: gate, half in training", "full/results_in_source0.5.json"),
    (
        "control: gate, half in training, near-duplicates not scored",
        "full/results_in_source0.5_no_near_duplicates.json",
    ),
    ("control: LoRA + gate, half in training", "full/results_lora250_lr1e-4_in_source0.5_xstest_unsafe.json"),
    ("control: linear probe, best layer", "probe/results.json"),
    ("control: MLP read-out, best", "probe/results.json#mlp"),
    ("control: Gemma 3 270M linear probe, best layer", "gemma3-270m/probe/results.json"),
)


def _labelled(text: str) -> tuple[str, str]:
    label, sep, path = text.partition("=")
    if not sep or not label or not path:
        example = "--run 'layer 12=/tmp/l12/results.json'"
        raise argparse.ArgumentTypeError(f"expected LABEL=PATH, got {text!r}; e.g. {example}")
    return label, path


def _stat(values: list[float]) -> dict[str, Any]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values)}  # fmt: skip


def protocol_row(results: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """`{source: {metric: {mean, std, n}}}` from a `generalization.py` results file (over its seeds' folds)."""
    row: dict[str, dict[str, dict[str, Any]]] = {}
    for source in SOURCES:
        folds = [f for f in results.get("folds", []) if f.get("left_out") == source]
        if folds:
            row[source] = {m: _stat([float(f[m]) for f in folds]) for m in METRICS if all(m in f for f in folds)}
    return row


def probe_row(results: dict[str, Any], fold: str, mlp: bool) -> dict[str, dict[str, dict[str, Any]]]:
    """The best read-out per source and metric, picked in hindsight: over layers (last-token pooling; one split, no
    spread), or with `mlp` over the MLP read-outs (mean ± std over each one's seeds). `fold`: "in_source" or "loso"."""
    candidates: list[dict[str, dict[str, dict[str, Any]]]] = []
    if mlp:
        for entry in results.get("mlp", {}).values():
            seeds = entry.get("seeds", [])
            candidates.append({s: {m: _stat([r["sources"][s][fold][m] for r in seeds]) for m in METRICS
                                   if all(m in r["sources"][s][fold] for r in seeds)}
                               for s in SOURCES if seeds and all(s in r["sources"] for r in seeds)})  # fmt: skip
    else:
        for layer in results.get("layers", {}).get("last", []):
            candidates.append({s: {m: {"mean": v, "std": None, "n": 1} for m, v in layer["sources"][s][fold].items()}
                               for s in SOURCES if s in layer.get("sources", {})})  # fmt: skip
    row: dict[str, dict[str, dict[str, Any]]] = {}
    for source in SOURCES:
        for metric in METRICS:
            stats = [c[source][metric] for c in candidates if metric in c.get(source, {})]
            if stats:
                row.setdefault(source, {})[metric] = max(stats, key=lambda stat: stat["mean"])
    return row


def read_run(label: str, path: str | Path, control: bool = False) -> dict[str, Any]:
    """One row of the summary from a results file; `PATH#mlp` reads a probe file's MLP read-outs."""
    text = str(path)
    file = Path(text.split("#")[0])
    if not file.is_absolute() and not file.exists():
        file = DOCS / file
    if not file.is_file():
        raise FileNotFoundError(f"{label!r}: no results file at {file}; pass a `results.json` of "
                                "benchmarks/generalization.py or benchmarks/layer_probe.py.")  # fmt: skip
    results = json.loads(file.read_text())
    if "layers" in results:  # a layer_probe.py file
        row = probe_row(results, "in_source" if control else "loso", mlp=text.endswith("#mlp"))
    elif "folds" in results:
        if (results.get("in_source") or 0) > 0 and not control:
            raise ValueError(f"{label!r}: {file} trained on part of each left-out source (in_source="
                             f"{results['in_source']}): pass it with --control, not --run.")  # fmt: skip
        row = protocol_row(results)
    else:
        raise ValueError(f"{label!r}: {file} is neither a generalization.py nor a layer_probe.py results file.")
    if not row:
        raise ValueError(f"{label!r}: {file} has no fold of {', '.join(SOURCES)} left out.")
    meta = results.get("meta", {})
    machine = meta.get("machine", {})
    shown = file.resolve().relative_to(ROOT) if file.resolve().is_relative_to(ROOT) else file
    return {"label": label, "file": str(shown), "control": control, "sources": row,
            "commit": (machine.get("commit") or "")[:7], "model": meta.get("model")}  # fmt: skip


def _cell(stat: dict[str, Any] | None) -> str:
    if stat is None:
        return "—"
    text = f"{stat['mean']:.3f}" + (f" ± {stat['std']:.3f}" if stat.get("std") is not None else "")
    return f"**{text}**" if stat["mean"] >= TARGET else text


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one line per run, AUROC per left-out source (bold where it reaches the target) for both metrics."""
    head = ["run", *[f"{s} (all benign)" for s in SOURCES], "XSTest-unsafe vs XSTest-safe B", "commit"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [_cell(row["sources"].get(s, {}).get("auroc")) for s in SOURCES]
        cells.append(_cell(row["sources"].get("xstest_unsafe", {}).get("auroc_vs_xstest_safe_b")))
        lines.append("| " + " | ".join([row["label"], *cells, row["commit"] or "—"]) + " |")
    reached = [r["label"] for r in rows if not r["control"] and all(
        r["sources"].get(s, {}).get("auroc", {}).get("mean", 0.0) >= TARGET for s in SOURCES)]  # fmt: skip
    lines += ["", f"Target: AUROC >= {TARGET} on every left-out source. Levers that reach it on all four: "
              + (", ".join(reached) if reached else "none") + "."]  # fmt: skip
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], out: Path) -> Path:
    """Two panels (vs all held-out benign; vs XSTest-safe B), a row per run, a marker per source, the target line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 0.42 * len(rows) + 1.8), sharey=True)
    offsets = {s: (i - 1.5) * 0.16 for i, s in enumerate(SOURCES)}
    for ax, metric, title in zip(axes, METRICS, ("vs all held-out benign", "vs XSTest-safe B (look-alikes)")):
        for source in SOURCES:
            ys, xs, errs = [], [], []
            for y, row in enumerate(rows):
                stat = row["sources"].get(source, {}).get(metric)
                if stat is not None:
                    ys.append(y + offsets[source])
                    xs.append(stat["mean"])
                    errs.append(stat["std"] or 0.0)
            ax.errorbar(xs, ys, xerr=errs, fmt="o", ms=4, capsize=2, label=source)
        ax.axvline(TARGET, color="black", linestyle="--", linewidth=1)
        first_control = next((i for i, r in enumerate(rows) if r["control"]), None)
        if first_control:
            ax.axhline(first_control - 0.5, color="grey", linewidth=0.8)
        ax.set_xlim(0.45, 1.0)
        ax.set_title(f"left-out gate AUROC, {title}")
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(rows)), [r["label"] for r in rows])
    axes[0].invert_yaxis()
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(SOURCES), fontsize=8, title="left-out source")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.55 / fig.get_figheight()))
    path = out / "levers.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--run",
        type=_labelled,
        action="append",
        default=None,
        help="LABEL=PATH of a lever's results.json (repeatable; default: the documented runs)",
    )
    parser.add_argument(
        "--control",
        type=_labelled,
        action="append",
        default=None,
        help="LABEL=PATH of a control (half of the source trained on; default: the documented ones)",
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for levers.md / .json / .png")
    parser.add_argument("--no-plot", action="store_true", help="skip the figure (no matplotlib needed)")
    args = parser.parse_args(argv)  # fmt: skip
    levers = args.run if args.run is not None else LEVERS
    controls = args.control if args.control is not None else (CONTROLS if args.run is None else ())
    rows = [read_run(label, path) for label, path in levers]
    rows += [read_run(label, path, control=True) for label, path in controls]
    args.out.mkdir(parents=True, exist_ok=True)
    text = table(rows)
    (args.out / "levers.md").write_text(text + "\n")
    (args.out / "levers.json").write_text(json.dumps({"target": TARGET, "rows": rows}, indent=2) + "\n")
    if not args.no_plot:
        plot(rows, args.out)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
