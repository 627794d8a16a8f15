"""How far do read-outs of a frozen backbone's layers go? A per-layer probe reference for the gate (issue 16).

The generalization protocol (`benchmarks/generalization.py`) measures the shipped gate, which reads one layer. This
benchmark asks the question behind it: does some layer of the frozen backbone separate a harmful source it never
trained on from benign look-alikes, and would it if the source *had* been trained on? For every decoder layer and two
poolings (the last prompt token; the mean over every token of the templated prompt — system message, user turn,
assistant header — but the first, which is an attention sink in mid layers), it fits a class-balanced,
L2-regularised logistic regression on standardised states (`safegate.defenses.probe_fit.fit_logistic`, L-BFGS;
no tuning: one fixed `--l2`) on the protocol's folds (`fold_split`, seed 0) and reports, per layer:

* **LOSO**: AUROC of each left-out source against all held-out benign prompts and against XSTest-safe B alone;
* **in-source control** (`--in-source`, default 0.5): the same folds with half of the left-out source in training
  (a fixed split) and the other half scored: what the states allow when the distribution is known.

Two further questions, on request: `--mlp-seeds N` fits non-linear read-outs (`mlp_fit`, one hidden layer) of the
last token's states — the best layer, the nine around it, all layers — with N seeds; `--frame TEXT` wraps every prompt
(e.g. "Is the following request harmful? Answer Yes or No. Request: {prompt}") and also scores the backbone as its own
judge (log-odds of `--answer-words` as its answer, nothing fitted).

These are read-outs of the last token or of a mean, not an upper bound on every gate: the attention gate, which reads
all positions of one layer, beats every linear probe when sources are left out (docs/generalization.md).

Prompt states of every layer are computed once (about 3 minutes on 2 cores for the ~2,900 prompts) and cached.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/layer_probe.py --out docs/generalization/probe

Outputs in `--out`: `results.json` (every layer, pooling, fold, read-out), `report.md`, `probe_layers.png`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from generalization import load_groups, machine  # noqa: E402

import safegate  # noqa: E402
from safegate.defenses.probe_fit import fit_logistic  # noqa: E402
from safegate.modeling.tokens import padding_id, text_tokenizer  # noqa: E402
from safegate.training.collate import build_inputs  # noqa: E402
from safegate.training.generalization import HARMFUL, fold_metrics, fold_split, group_names, summarise  # noqa: E402

POOLINGS = ("last", "mean")
FEATURES_VERSION = 1  # part of the cache key: bump when the pooling or the prompt formatting changes


def layer_features(model: Any, processor: Any, records: list[dict[str, Any]], batch_size: int = 8) -> torch.Tensor:
    """`[prompts, pooling (last, mean), layers + 1, hidden]` states of the frozen model.

    transformers' `hidden_states`: index 0 the embeddings, L the output of decoder layer L-1 (`GateConfig(layer=L-1)`),
    the last one after the final norm (the gate's default tap, `layer=-1`).
    """
    pad = padding_id(processor)
    rows = []
    model.eval()
    from tqdm.auto import tqdm

    for start in tqdm(range(0, len(records), batch_size), desc="layer states"):
        chunk = records[start : start + batch_size]
        ids = [build_inputs(processor, {"prompt": r["prompt"], "label": r["label"]})["prompt_ids"] for r in chunk]
        width = max(map(len, ids))
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, row in enumerate(ids):
            input_ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
        with torch.no_grad():
            hidden = torch.stack(model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True,
                                       use_cache=False).hidden_states, 1).float()  # fmt: skip
        last = torch.tensor([len(r) - 1 for r in ids])
        body = mask.clone()
        body[:, 0] = 0  # position 0 is an attention sink (huge norm) in mid layers: keep it out of the mean
        mean = (hidden * body[:, None, :, None]).sum(2) / body.sum(1).clamp(min=1)[:, None, None]
        rows.append(torch.stack([hidden[torch.arange(len(ids)), :, last], mean], 1))
    return torch.cat(rows)


Scorer = Callable[[torch.Tensor], torch.Tensor]
Fit = Callable[[torch.Tensor, torch.Tensor], Scorer]


def linear_fit(l2: float) -> Fit:
    """The probe: `fit_logistic`, class-balanced, on standardised states; the scorer gives logits.

    The class-balanced mean loss plus `l2 * |w|^2` is `fit_logistic`'s objective (summed loss times C plus
    `|w|^2 / 2`) with `C = 1 / (2 * l2 * n)`: the same optimum.
    """

    def fit(x: torch.Tensor, y: torch.Tensor) -> Scorer:
        w, b, mu, sd = fit_logistic(x, y, c=1.0 / (2 * l2 * len(x)), balanced=True)
        return lambda z: ((z - mu) / sd) @ w + b

    return fit


def mlp_fit(seed: int, hidden: int = 256, epochs: int = 60, batch: int = 64) -> Fit:
    """A non-linear read-out: one hidden GELU layer on standardised states, class-balanced cross-entropy, AdamW
    (lr 1e-3, weight decay 1e-2), dropout 0.1 on the input and 0.3 on the hidden layer. One setting, not tuned."""

    def fit(x: torch.Tensor, y: torch.Tensor) -> Scorer:
        with torch.random.fork_rng():  # the seed fixes the initialisation and dropout without touching the caller's
            torch.manual_seed(seed)
            return train(x, y)

    def train(x: torch.Tensor, y: torch.Tensor) -> Scorer:
        generator = torch.Generator().manual_seed(seed)
        mu, sd = x.mean(0), x.std(0).clamp(min=1e-6)
        z, target = (x - mu) / sd, y.float()
        positive = target.mean()
        rows = torch.where(target > 0.5, 0.5 / positive, 0.5 / (1 - positive))
        net = nn.Sequential(nn.Dropout(0.1), nn.Linear(x.shape[1], hidden), nn.GELU(), nn.Dropout(0.3),
                            nn.Linear(hidden, 1))  # fmt: skip
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-2)
        for _ in range(epochs):
            order = torch.randperm(len(z), generator=generator)
            for start in range(0, len(z), batch):
                pick = order[start : start + batch]
                loss = nn.functional.binary_cross_entropy_with_logits(net(z[pick])[:, 0], target[pick], rows[pick])
                opt.zero_grad()
                loss.backward()
                opt.step()
        net.eval()

        def score(states: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return net((states - mu) / sd)[:, 0]

        return score

    return fit


def fixed_score(x: torch.Tensor, y: torch.Tensor) -> Scorer:
    """No fitting: the feature (one column) is the score (the zero-shot judge)."""
    return lambda z: z[:, 0]


def probe_fold(
    feats: torch.Tensor, labels: torch.Tensor, fold: dict[str, Any], source: str, fit: Fit
) -> dict[str, float]:
    """Fit a read-out on the fold's training pool (its validation split included); the protocol's AUROCs of the
    left-out prompts (`fold_metrics`) against all held-out benign and against XSTest-safe B."""
    train = torch.tensor(fold["train"] + fold["val"], dtype=torch.long)
    metrics = fold_metrics(fit(feats[train], labels[train])(feats).double(), fold, source, fpr=0.05)
    return {"auroc": metrics["auroc"], "auroc_vs_xstest_safe_b": metrics["auroc_vs_xstest_safe_b"]}


def answer_token_ids(tokenizer: Any, word: str) -> list[int]:
    """The first token of `word` as an answer would start: the word alone and after a space, skipping forms whose
    first token is bare whitespace (SentencePiece's "▁", a byte-level "Ġ")."""
    ids = set()
    for form in (word, " " + word):
        first = tokenizer.encode(form, add_special_tokens=False)[:1]
        if first and tokenizer.decode(first).strip():
            ids.add(first[0])
    if not ids:
        raise ValueError(f"--answer-words: {word!r} has no first token that is not whitespace; pick another word")
    return sorted(ids)


def answer_log_odds(
    model: Any, processor: Any, final_states: torch.Tensor, words: tuple[str, str], chunk: int = 256
) -> torch.Tensor:
    """The backbone as its own judge: log p(first word) - log p(second word) as the answer's first token (ids from
    `answer_token_ids`), from the final-norm states of the last prompt token through the LM head (models that
    transform logits after the head, e.g. soft-capping, are not covered)."""
    tok = text_tokenizer(processor)
    first, second = (answer_token_ids(tok, w) for w in words)
    if set(first) & set(second):
        raise ValueError(f"--answer-words {words[0]!r} and {words[1]!r} share a first token: pick distinct words")
    odds = []
    with torch.no_grad():
        for start in range(0, len(final_states), chunk):
            logp = model.get_output_embeddings()(final_states[start : start + chunk].to(model.dtype)).float()
            logp = logp.log_softmax(-1)
            odds.append(logp[:, first].logsumexp(-1) - logp[:, second].logsumexp(-1))
    return torch.cat(odds)


def layer_band(best: int, states: int, width: int = 4) -> list[int]:
    """Decoder layers `best - width` .. `best + width` (embeddings excluded), clipped to the `states - 1` layers."""
    return list(range(max(1, best - width), min(states - 1, best + width) + 1))


def plot(report: dict[str, Any], out: Path) -> None:
    """`probe_layers.png`: mean AUROC over sources per layer, left out and in-source, for both poolings."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    metrics = (("auroc", "vs all held-out benign"), ("auroc_vs_xstest_safe_b", "vs XSTest-safe B"))
    for ax, (metric, title) in zip(axes, metrics, strict=True):
        for pooling, style in zip(POOLINGS, ("-", "--"), strict=True):
            for mode, color in (("loso", "tab:red"), ("in_source", "tab:blue")):
                curve = [row[mode][metric] for row in report["layers"][pooling]]
                read = "last token" if pooling == "last" else "mean over tokens"
                label = f"{'left out' if mode == 'loso' else 'in-source control'}, {read}"
                ax.plot(range(len(curve)), curve, style, color=color, label=label)
        ax.axhline(0.95, color="grey", lw=0.7, ls=":")
        ax.set(xlabel="layer (0 = embeddings)", title=f"linear probe, mean over 4 sources, {title}")
    axes[0].set_ylabel("AUROC (mean over left-out sources)")
    axes[0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "probe_layers.png", dpi=110)
    plt.close(fig)


def load_features(args: argparse.Namespace, records: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Every layer's states (cached), and with `--frame` the backbone's own answer log-odds (`answer_log_odds`)."""
    framed = [{**r, "prompt": args.frame.replace("{prompt}", r["prompt"])} for r in records] if args.frame else records
    payload = [FEATURES_VERSION, args.model, [[r["prompt"], r["label"]] for r in framed]]
    key = hashlib.sha256(json.dumps(payload).encode())
    path = Path(args.cache_dir) / f"layers_{key.hexdigest()[:24]}.pt"
    model = processor = None
    if path.exists():
        feats = torch.load(path, weights_only=True)
    else:
        model, processor = safegate.load_model(args.model, dtype="float32")
        feats = layer_features(model, processor, framed)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(feats, path)
    if not args.frame:
        return feats, None
    if model is None:
        model, processor = safegate.load_model(args.model, dtype="float32")
    return feats, answer_log_odds(model, processor, feats[:, 0, -1], args.answer_words)


def spread(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean, std, min and max over seeds of `read_out` results (means over sources and each source's AUROCs)."""

    modes, metrics = ("loso", "in_source"), ("auroc", "auroc_vs_xstest_safe_b")

    def over_seeds(pick: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
        return {mode: {m: summarise([pick(r)[mode][m] for r in runs]) for m in metrics} for mode in modes}

    return over_seeds(lambda r: r) | {
        "sources": {s: over_seeds(lambda r, s=s: r["sources"][s]) for s in runs[0]["sources"]}
    }


def report_lines(report: dict[str, Any]) -> list[str]:
    """`report.md`: best layer per pooling and mode, the all-layer probe, the MLP read-outs, the zero-shot judge."""
    head = "| pooling | mode | best layer (all benign) | AUROC | best layer (vs XSTest-safe B) | AUROC | last layer |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for pooling, rows in report["layers"].items():
        for mode in ("loso", "in_source"):
            best = max(rows, key=lambda r: r[mode]["auroc"])
            hard = max(rows, key=lambda r: r[mode]["auroc_vs_xstest_safe_b"])
            lines.append(f"| {pooling} | {mode} | {best['layer']} | {best[mode]['auroc']:.3f} | {hard['layer']} | "
                         f"{hard[mode]['auroc_vs_xstest_safe_b']:.3f} | {rows[-1][mode]['auroc']:.3f} |")  # fmt: skip
    lines += ["", "Every layer but the embeddings concatenated (one probe on all of them):", "",
              "| pooling | left out: vs all benign | vs XSTest-safe B | in-source: vs all benign | vs XSTest-safe B |",
              "|---|---|---|---|---|"]  # fmt: skip
    for pooling, row in report["all_layers"].items():
        lines.append(f"| {pooling} | " + " | ".join(f"{row[mode][m]:.3f}" for mode in ("loso", "in_source")
                                                    for m in ("auroc", "auroc_vs_xstest_safe_b")) + " |")  # fmt: skip
    if report["mlp"]:
        seeds = len(next(iter(report["mlp"].values()))["seeds"])
        lines += ["", f"Non-linear read-outs of the last token's states (`mlp_fit`, mean ± std over {seeds} seed(s)); "
                  "the last column is XSTest-unsafe against XSTest-safe B, in-source:", "",
                  "| read-out | left out: vs all benign | vs XSTest-safe B | in-source: vs all benign "
                  "| vs XSTest-safe B | XSTest-unsafe vs XSTest-safe B |", "|---|---|---|---|---|---|"]  # fmt: skip
        for name, row in report["mlp"].items():
            cells = [row[mode][m] for mode in ("loso", "in_source") for m in ("auroc", "auroc_vs_xstest_safe_b")]
            cells.append(row["sources"]["xstest_unsafe"]["in_source"]["auroc_vs_xstest_safe_b"])
            lines.append(f"| {name} | " + " | ".join(f"{c['mean']:.3f} ± {c['std']:.3f}" for c in cells) + " |")
    if report["zero_shot"]:
        row = report["zero_shot"]
        words = "/".join(report["meta"]["answer_words"])
        lines += ["", f"The backbone as its own judge (log-odds of {words!r} as the answer to the framed prompt; "
                  f"nothing fitted): left out vs all benign {row['loso']['auroc']:.3f}, vs "
                  f"XSTest-safe B {row['loso']['auroc_vs_xstest_safe_b']:.3f}."]  # fmt: skip
    box = report["meta"]["machine"]
    lines += ["", f"Commit {box['commit']}{' (dirty)' if box['dirty'] else ''}, {box['cpu']}, {box['date']}, "
              f"{report['meta']['seconds']:.0f} s."]  # fmt: skip
    if report["meta"]["frame"]:
        lines.append(f"Prompts framed as {report['meta']['frame']!r}.")
    if report["meta"].get("drop_near_duplicates"):
        lines.append("Left-out prompts with a harmful near-duplicate in training are not scored.")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct", help="backbone for safegate.load_model")
    ap.add_argument("--l2", type=float, default=1e-3, help="L2 penalty on the probe's weights (fixed, not tuned)")
    ap.add_argument("--in-source", type=float, default=0.5, help="share of the left-out source in the control")
    ap.add_argument("--mlp-seeds", type=int, default=0, help="also fit non-linear read-outs (`mlp_fit`) with N "
                    "seeds on the best last-token layer, the up to 9 layers around it (`layer_band`) and all layers "
                    "(~10 min a seed on 2 cores)")  # fmt: skip
    ap.add_argument("--frame", default=None, help="wrap each prompt in this text before the chat template: every "
                    "literal {prompt} is replaced by the prompt (no other braces are special), e.g. a question asking "
                    "the backbone whether the request is harmful")  # fmt: skip
    ap.add_argument("--answer-words", default=None, help="with --frame (default Yes,No): the backbone's own "
                    "verdict is the log-odds of the first word over the second as its answer")  # fmt: skip
    ap.add_argument("--drop-near-duplicates", action="store_true", help="score no left-out prompt that has a harmful "
                    "near-duplicate in training (`leakage.near_duplicates`), left out and in-source")  # fmt: skip
    ap.add_argument("--limit-per-source", type=int, default=None, help="at most N prompts per group (quick run)")
    ap.add_argument("--max-prompt-chars", type=int, default=1000, help="drop longer prompts (as the protocol)")
    ap.add_argument("--out", default="probe-out", help="output folder")
    ap.add_argument("--cache-dir", default=str(Path.home() / ".cache/safegate/generalization"), help="state cache")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = ap.parse_args(argv)
    if not 0 < args.in_source < 1:
        ap.error(f"--in-source must be in (0, 1), got {args.in_source}")
    if args.limit_per_source is not None and args.limit_per_source < 2:
        ap.error(f"--limit-per-source must be >= 2 (or omitted for all prompts), got {args.limit_per_source}")
    if args.l2 <= 0:
        ap.error(f"--l2 must be > 0 (the probe's weight penalty), got {args.l2}")
    if args.mlp_seeds < 0:
        ap.error(f"--mlp-seeds must be >= 0 (0: no non-linear read-outs), got {args.mlp_seeds}")
    if args.frame is not None and "{prompt}" not in args.frame:
        ap.error(f"--frame must contain {{prompt}} where each prompt goes, got {args.frame!r}")
    if args.answer_words is not None and args.frame is None:
        ap.error("--answer-words scores the answer to a framed prompt: give --frame too")
    words = [w.strip() for w in (args.answer_words or "Yes,No").split(",")]
    if len(words) != 2 or not all(words) or words[0] == words[1]:
        ap.error(
            f"--answer-words must be two different comma-separated words (e.g. Yes,No), got {args.answer_words!r}"
        )
    args.answer_words = tuple(words)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    groups = load_groups(args.limit_per_source, args.max_prompt_chars)
    records = [r for name in group_names() for r in groups[name]]
    feats, own_verdict = load_features(args, records)
    labels = torch.tensor([int(r["label"] == "unsafe") for r in records])
    clean = {"drop_near_duplicates": args.drop_near_duplicates}
    folds = {s: fold_split(groups, s, seed=0, **clean) for s in HARMFUL}
    controls = {s: fold_split(groups, s, seed=0, in_source=args.in_source, **clean) for s in HARMFUL}

    def read_out(x: torch.Tensor, fit: Fit) -> dict[str, Any]:
        """One read-out per fold, left out and in-source, on features `x`; their means over the sources."""
        per = {s: {"loso": probe_fold(x, labels, folds[s], s, fit),
                   "in_source": probe_fold(x, labels, controls[s], s, fit)} for s in HARMFUL}  # fmt: skip
        mean = {mode: {m: sum(per[s][mode][m] for s in HARMFUL) / len(HARMFUL) for m in per[HARMFUL[0]][mode]}
                for mode in ("loso", "in_source")}  # fmt: skip
        return {**mean, "sources": per}

    linear = linear_fit(args.l2)
    report: dict[str, Any] = {"layers": {}, "all_layers": {}, "mlp": {}, "zero_shot": None,
                              "meta": {**vars(args), "machine": machine(), "prompts": len(records)}}  # fmt: skip
    for p, pooling in enumerate(POOLINGS):
        rows = []
        for layer in range(feats.shape[2]):
            rows.append({"layer": layer, **read_out(feats[:, p, layer], linear)})
            mean = rows[-1]
            print(f"{pooling} layer {layer:2d}: LOSO {mean['loso']['auroc']:.3f} / vs XSTest-safe B "
                  f"{mean['loso']['auroc_vs_xstest_safe_b']:.3f}; in-source {mean['in_source']['auroc']:.3f} / "
                  f"{mean['in_source']['auroc_vs_xstest_safe_b']:.3f}", flush=True)  # fmt: skip
        report["layers"][pooling] = rows
        report["all_layers"][pooling] = read_out(feats[:, p, 1:].flatten(1), linear)  # every layer side by side
    if args.mlp_seeds:
        best = max(report["layers"]["last"][1:], key=lambda r: r["in_source"]["auroc_vs_xstest_safe_b"])["layer"]
        band = layer_band(best, feats.shape[2])
        inputs = {f"layer {best}": [best], f"layers {band[0]}-{band[-1]}": band,
                  "all layers": list(range(1, feats.shape[2]))}  # fmt: skip
        for name, layers in inputs.items():
            x = feats[:, 0, layers].flatten(1)
            runs = [read_out(x, mlp_fit(seed)) for seed in range(args.mlp_seeds)]
            report["mlp"][name] = {"layers": layers, "seeds": runs, **spread(runs)}
            print(
                f"MLP {name}: in-source XSTest-unsafe vs XSTest-safe B "
                f"{report['mlp'][name]['sources']['xstest_unsafe']['in_source']['auroc_vs_xstest_safe_b']}",
                flush=True,
            )
    if own_verdict is not None:
        report["zero_shot"] = read_out(own_verdict[:, None], fixed_score)
    report["meta"]["seconds"] = time.perf_counter() - started
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=1))
    lines = report_lines(report)
    (out / "report.md").write_text("\n".join(lines) + "\n")
    plot(report, out)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
