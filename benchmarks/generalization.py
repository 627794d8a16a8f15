"""`make generalization`: leave-one-source-out generalization of the gate on a real model (docs/generalization.md).

    HF_HUB_OFFLINE=1 python benchmarks/generalization.py                       # all prompts, 3 seeds
    HF_HUB_OFFLINE=1 python benchmarks/generalization.py --limit-per-source 120 --seeds 1
    HF_HUB_OFFLINE=1 python benchmarks/generalization.py --layer 15 --augment-phrasing 0.5   # the two levers
    HF_HUB_OFFLINE=1 python benchmarks/generalization.py --fit rows     # ablation: the two token rows alone
    HF_HUB_OFFLINE=1 python benchmarks/generalization.py --add-source tense_rephrased   # a fifth harmful source
    HF_HUB_OFFLINE=1 python benchmarks/generalization.py --lora-steps 250 --left-out xstest_unsafe   # LoRA too

Writes to `--out` (default `generalization-out/`): `results.json` (every number, git commit, machine), `report.md`
(the table) and `roc_<source>.png` (one ROC per left-out source, one curve per seed). Prompt states are cached in
`--cache-dir`, keyed by model, gate layer, safety prompt and prompts: re-running after a gate or fit change only
re-fits. The protocol itself is `safegate.training.generalization`.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

import safegate
from safegate.data.build import split_records
from safegate.data.hard_negatives import hard_negatives
from safegate.data.leakage import normalise_prompt
from safegate.data.sources import DATASETS, load_named_set
from safegate.training.generalization import (
    FIT_MODES,
    HARMFUL,
    SPLIT_SEED,
    StateStore,
    group_names,
    run_protocol,
)

ROOT = Path(__file__).resolve().parents[1]
FIT_TITLES = {"gate": "the gate", "rows": "the two token rows, gate held constant", "both": "gate and token rows"}
ADDABLE = sorted(n for n, spec in DATASETS.items() if spec.prompts and n not in (*HARMFUL, "alpaca", "xstest"))
COLUMNS = [
    ("auroc", "gate AUROC"),
    ("auroc_vs_xstest_safe_b", "AUROC vs XSTest-safe B"),
    ("auroc_vs_hard_negatives_eval", "AUROC vs topic-matched"),
    ("auroc_vs_alpaca_held", "AUROC vs Alpaca held-out"),
    ("recall", "recall @ 5 % val FPR"),
    ("recall_shipped", "recall @ 0.5"),
    ("fpr_xstest_safe_b", "FPR XSTest-safe B"),
    ("fpr_hard_negatives_eval", "FPR topic-matched"),
    ("fpr_alpaca_held", "FPR Alpaca held-out"),
    ("fpr_xstest_safe_b_shipped", "FPR XSTest-safe B @ 0.5"),
]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct", help="backbone for safegate.load_model")
    ap.add_argument(
        "--recipe",
        default=str(ROOT / "recipes/smollm2_135m_cpu.yaml"),
        help="recipe whose `gate` block and `fit_gate` epochs/lr are measured",
    )
    ap.add_argument("--seeds", type=int, default=3, help="number of training seeds (0, 1, ...)")
    ap.add_argument("--limit-per-source", type=int, default=None, help="at most N prompts per group (quick run)")
    ap.add_argument("--max-prompt-chars", type=int, default=1000, help="drop longer prompts (HarmBench contexts)")
    ap.add_argument("--layer", type=int, default=None, help="gate layer (default: the recipe's, else -1)")
    ap.add_argument("--epochs", type=int, default=None, help="fit_gate epochs (default: the recipe's)")
    ap.add_argument("--lr", type=float, default=None, help="fit_gate learning rate (default: the recipe's)")
    ap.add_argument("--weight-decay", type=float, default=None, help="fit_gate weight decay (default: 0)")
    ap.add_argument("--attention-dim", type=int, default=None, help="gate attention_dim (default: the recipe's)")
    ap.add_argument("--members", type=int, default=None, help="gates in the ensemble (default: the recipe's)")
    ap.add_argument(
        "--safety-prompt",
        default=None,
        metavar="TEXT",
        help="system message before every prompt whose states the gate reads (GateConfig.safety_prompt; "
        "default: the recipe's, else none: the chat template's own)",
    )
    ap.add_argument(
        "--augment-phrasing",
        type=float,
        default=0.0,
        metavar="SHARE",
        help="rephrase this share of each fold's training records (harmful and benign; 0 = off)",
    )
    ap.add_argument(
        "--fit",
        choices=sorted(FIT_MODES),
        default="gate",
        help="what each fold fits: the gate (default), the two token rows alone (gate constant), or both",
    )
    ap.add_argument(
        "--add-source",
        action="append",
        default=[],
        choices=ADDABLE,
        help="one more harmful named set: trained on in every other fold, left out in its own (repeatable)",
    )
    ap.add_argument(
        "--left-out",
        action="append",
        default=None,
        metavar="SOURCE",
        help="run only this fold (repeatable; default: every harmful source)",
    )
    ap.add_argument(
        "--lora-steps",
        type=int,
        default=0,
        help="after the gate fit, train LoRA + gate + token rows on each fold's prompts for N steps (verdict only, "
        "the recipe's `training` batch, learning rate and schedule, its `gate_lr`); 0 = frozen states only",
    )
    ap.add_argument(
        "--lora-lr", type=float, default=None, help="learning rate of that LoRA phase (default: the recipe's)"
    )
    ap.add_argument(
        "--in-source",
        type=float,
        default=0.0,
        metavar="SHARE",
        help="in-distribution control: also train on this share of each fold's own source (a fixed split) and "
        "evaluate on the rest; 0 = the source left out whole (the protocol)",
    )
    ap.add_argument(
        "--drop-near-duplicates",
        action="store_true",
        help="score no left-out prompt that has a harmful near-duplicate in training (word-trigram Jaccard >= 0.4, "
        "`leakage.near_duplicates`); they are counted either way",
    )
    ap.add_argument("--fpr", type=float, default=0.05, help="target FPR of the calibrated threshold")
    ap.add_argument("--out", default="generalization-out", help="output folder")
    ap.add_argument(
        "--cache-dir",
        default=str(Path.home() / ".cache/safegate/generalization"),
        help="prompt-state cache ('' disables it)",
    )
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = ap.parse_args(argv)
    if args.seeds < 1:
        ap.error(f"--seeds must be >= 1, got {args.seeds}")
    if args.limit_per_source is not None and args.limit_per_source < 2:
        ap.error(f"--limit-per-source must be >= 2 (or omitted for all prompts), got {args.limit_per_source}")
    if not 0 <= args.augment_phrasing <= 1:
        ap.error(f"--augment-phrasing must be in [0, 1] (0 = off), got {args.augment_phrasing}")
    if len(set(args.add_source)) != len(args.add_source):
        ap.error(f"--add-source names each set once, got {args.add_source}")
    harmful = [*HARMFUL, *args.add_source]
    unknown = [name for name in args.left_out or [] if name not in harmful]
    if unknown:
        ap.error(f"--left-out {unknown[0]!r} is not a harmful source of this run; choose from {harmful}")
    if args.lora_steps < 0:
        ap.error(f"--lora-steps must be >= 0 (0 = frozen states only), got {args.lora_steps}")
    if args.lora_lr is not None and not (args.lora_steps and args.lora_lr > 0):
        ap.error(f"--lora-lr {args.lora_lr} needs --lora-steps N > 0 and a positive rate")
    if args.lora_steps and args.fit != "gate":
        ap.error(f"--lora-steps trains gate, rows and LoRA after the gate fit; it needs --fit gate, got {args.fit!r}")
    if args.safety_prompt is not None and not args.safety_prompt.strip():
        ap.error("--safety-prompt is blank; pass the system message's text, or omit the flag for none")
    if not 0 <= args.in_source < 1:
        ap.error(f"--in-source must be in [0, 1) (0 = left out whole), got {args.in_source}")
    if not 0 < args.fpr < 1:
        ap.error(f"--fpr must be in (0, 1), got {args.fpr}")
    if not Path(args.recipe).is_file():
        ap.error(f"--recipe {args.recipe!r} is not a file; pass a recipe YAML such as recipes/smollm2_135m_cpu.yaml")
    return args


def _limit(records: list[dict[str, Any]], limit: int | None, salt: str) -> list[dict[str, Any]]:
    if limit is None or len(records) <= limit:
        return records
    """The `limit` records whose hash of (salt, prompt) ranks first, in input order (independent of the order)."""
    rank = sorted(
        range(len(records)), key=lambda i: hashlib.sha256(f"{salt}\0{records[i]['prompt']}".encode()).digest()
    )
    keep = set(rank[:limit])
    return [r for i, r in enumerate(records) if i in keep]


def load_groups(
    limit: int | None, max_chars: int, added: tuple[str, ...] | list[str] = ()
) -> dict[str, list[dict[str, Any]]]:
    """The protocol's groups from the library's named-set loaders and `hard_negatives` (duplicates removed).

    `added` names more harmful named sets (`ADDABLE`), each one more group after `HARMFUL`.
    """

    def clean(records: list[dict[str, Any]], label: str) -> list[dict[str, Any]]:
        seen, out = set(), []
        for r in records:
            key = normalise_prompt(r["prompt"])
            if r["label"] == label and len(r["prompt"]) <= max_chars and key not in seen:
                seen.add(key)
                kind = r.get("category") or r.get("type")  # XSTest names its kinds of prompt `type`
                out.append({"prompt": r["prompt"], "label": label, **({"category": kind} if kind else {})})
        return out

    harmful_sets = ("advbench", "harmbench", "do_not_answer", *added)
    groups = {name: clean(load_named_set(name), "unsafe") for name in harmful_sets}
    xstest = load_named_set("xstest")
    groups["xstest_unsafe"] = clean(xstest, "unsafe")
    groups["xstest_safe_a"], groups["xstest_safe_b"] = split_records(clean(xstest, "safe"), 0.5, seed=SPLIT_SEED)
    groups["alpaca_train"], groups["alpaca_held"] = split_records(
        clean(load_named_set("alpaca"), "safe"), 0.3, seed=SPLIT_SEED
    )
    groups["hard_negatives_train"] = clean(hard_negatives("train"), "safe")
    groups["hard_negatives_eval"] = clean(hard_negatives("eval"), "safe")
    return {name: _limit(groups[name], limit, name) for name in group_names([*HARMFUL, *added])}


def machine() -> dict[str, Any]:
    import transformers

    cpu = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").exists()
        else ""
    )
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
    ).stdout.strip()
    return {
        "commit": commit.strip() or None,
        "dirty": bool(dirty),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def markdown(report: dict[str, Any]) -> str:
    cell = lambda s: f"{s['mean']:.3f} ± {s['std']:.3f}"  # noqa: E731
    head = "| left-out source | n | near-duplicates in training | " + " | ".join(title for _, title in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 3)]
    for source, row in report["summary"].items():
        scored = [f["n"] for f in report["folds"] if f["left_out"] == source]
        # the prompts of the source scored (all of it, or the rest with --in-source); those with a harmful paraphrase
        n, near = (scored[0]["left_out"], scored[0].get("near_duplicates", "")) if scored else ("", "")
        lines.append(f"| {source} | {n} | {near} | " + " | ".join(cell(row[m]) for m, _ in COLUMNS) + " |")
    category_rows = []
    for source, table in (report.get("recall_by_category") or {}).items():
        sizes = next(f for f in report["folds"] if f["left_out"] == source).get("n_by_category", {})
        category_rows += [f"| {source} | {category[:60]} | {sizes[category]} | {cell(stat)} |"
                          for category, stat in table.items() if sizes.get(category, 0) >= 10]  # fmt: skip
    title = "Recall at the calibrated threshold by the left-out source's own categories (≥ 10 prompts; mean ± std):"
    categories = ["", title, "", "| left-out source | category | n | recall |", "|---|---|---|---|", *category_rows]
    meta = report["meta"]
    box = meta["machine"]
    return "\n".join(
        [
            f"LOSO on `{meta['model']}` ({'LoRA trained per fold' if meta.get('lora_steps') else 'frozen states'}; "
            f"fitted: {FIT_TITLES[meta.get('fit', 'gate')]}), layer "
            f"{meta['layer']}, fit_gate {meta['fit_kwargs']}, "
            f"phrasing augmentation {meta['augment_phrasing'] or 'off'}, "
            f"added harmful sources {', '.join(meta.get('added_sources') or []) or 'none'}, "
            f"LoRA steps per fold {meta.get('lora_steps') or 'none (frozen states)'}, "
            f"safety prompt {meta.get('safety_prompt')!r}, "
            f"share of the left-out source trained on {meta.get('in_source') or 'none (left out whole)'}, "
            f"near-duplicates of training prompts {'not scored' if meta.get('drop_near_duplicates') else 'scored'}, "
            f"seeds {meta['seeds']}, limit per source {meta['limit_per_source']}; mean ± std over seeds "
            "(last row: mean of the sources' means ± std across sources).",
            "",
            *lines,
            *(categories if category_rows else []),
            "",
            f"Commit {box['commit']}{' (dirty)' if box['dirty'] else ''}, {box['cpu']} ({box['cpu_count']} CPUs, "
            f"{box['torch_threads']} threads), torch {box['torch']}, {box['date']}, {meta['seconds']:.0f} s.",
        ]
    )


def plot(report: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for source in report.get("left_out", HARMFUL):
        fig, ax = plt.subplots(figsize=(4.2, 4.2))
        for fold in (f for f in report["folds"] if f["left_out"] == source):
            ax.plot(fold["roc"]["fpr"], fold["roc"]["tpr"], label=f"seed {fold['seed']} (AUROC {fold['auroc']:.3f})")
            ax.plot([fold["fpr_xstest_safe_b"]], [fold["recall"]], "o", color=ax.lines[-1].get_color())
        ax.plot([0, 1], [0, 1], ":", color="grey")
        ax.axvline(0.05, color="grey", lw=0.5)
        ax.set(
            xlabel="false-positive rate (held-out benign)",
            ylabel="recall (left-out harmful)",
            title=f"left out: {source}",
        )
        ax.legend(loc="lower right", fontsize=7)
        fig.tight_layout()
        path = out / f"roc_{source}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path.name)
    return paths


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    recipe = yaml.safe_load(Path(args.recipe).read_text())
    gate = dict(recipe.get("gate") or {})
    if args.layer is not None:
        gate["layer"] = args.layer
    if args.attention_dim is not None:
        gate["attention_dim"] = args.attention_dim
    if args.safety_prompt is not None:
        gate["safety_prompt"] = args.safety_prompt
    if args.members is not None:
        gate["members"] = args.members
    fit = recipe.get("fit_gate") or {}
    fit_kwargs = {"epochs": args.epochs or fit.get("epochs", 30), "lr": args.lr or fit.get("lr", 1e-2)}
    if args.weight_decay is not None:
        fit_kwargs["weight_decay"] = args.weight_decay
    for key in ("beta", "aux_weight"):
        if key in recipe:
            fit_kwargs[key] = recipe[key]
    config = safegate.GateConfig(**gate)
    groups = load_groups(args.limit_per_source, args.max_prompt_chars, args.add_source)
    print("prompts per group:", {k: len(v) for k, v in groups.items()}, flush=True)
    model, processor = safegate.load_model(args.model, dtype=(recipe.get("model") or {}).get("dtype"))
    store = StateStore(args.cache_dir or None)
    lora_args = None
    if args.lora_steps:
        keys = ("learning_rate", "per_device_train_batch_size", "lr_scheduler_type", "warmup_steps", "use_cpu")
        lora_args = {k: v for k, v in (recipe.get("training") or {}).items() if k in keys}
        lora_args.update(max_steps=args.lora_steps, logging_steps=max(1, args.lora_steps // 5), disable_tqdm=True)
        if args.lora_lr is not None:
            lora_args["learning_rate"] = args.lora_lr
    report = run_protocol(
        model,
        processor,
        groups,
        config=config,
        seeds=list(range(args.seeds)),
        fit_kwargs=fit_kwargs,
        fpr=args.fpr,
        store=store,
        model_name=args.model,
        augment_share=args.augment_phrasing,
        fit_mode=args.fit,
        progress=True,
        harmful=[*HARMFUL, *args.add_source],
        left_out=args.left_out,
        lora_args=lora_args,
        gate_lr=recipe.get("gate_lr"),
        in_source=args.in_source,
        drop_near_duplicates=args.drop_near_duplicates,
    )
    report["meta"] = {
        "model": args.model,
        "layer": config.layer,
        "attention_dim": config.attention_dim,
        "members": config.members,
        "safety_prompt": config.safety_prompt,
        "in_source": args.in_source,
        "drop_near_duplicates": args.drop_near_duplicates,
        "fit_kwargs": fit_kwargs,
        "augment_phrasing": args.augment_phrasing,
        "fit": args.fit,
        "added_sources": args.add_source,
        "lora_steps": args.lora_steps,
        "lora_args": lora_args,
        "gate_lr": recipe.get("gate_lr") if args.lora_steps else None,
        "fpr": args.fpr,
        "seeds": args.seeds,
        "limit_per_source": args.limit_per_source,
        "recipe": args.recipe,
        "max_prompt_chars": args.max_prompt_chars,
        "argv": sys.argv[1:],
        "machine": machine(),
        "seconds": time.perf_counter() - started,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report["meta"]["plots"] = plot(report, out)
    (out / "results.json").write_text(json.dumps(report, indent=1))
    table = markdown(report)
    (out / "report.md").write_text(table + "\n")
    print(table)
    print(f"wrote {out}/results.json, report.md, roc_*.png (cache: {report['cache']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
