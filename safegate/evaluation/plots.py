"""Report plots (matplotlib, Agg canvas; no display and no global backend change).

- `roc.png`: ROC curve of the gate's p(unsafe), harmful = positive, with the AUROC in the legend.
- `score_hist.png`: histograms (densities) of p(unsafe) for harmful and benign requests.
- `asr_by_attack.png`: ASR per attack (and dataset), base model vs gated model, with 95 % intervals.
- `threshold_sweep.png`: gated ASR and over-refusal at every other threshold of the same gate
  (`safegate.evaluation.threshold_sweep`), the shipped one marked.

Example:
    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "roc.png"
    >>> roc_plot(path, [0.9, 0.2, 0.7, 0.1], [1, 0, 1, 0])
    >>> path.read_bytes()[:8] == b"\\x89PNG\\r\\n\\x1a\\n"
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from safegate.evaluation.metrics import auroc, roc_curve
from safegate.evaluation.threshold_sweep import Row, groups, scored, sweep

PLOT_FILES = ("roc.png", "score_hist.png", "asr_by_attack.png", "threshold_sweep.png")
PLOTS_EXTRA = "pip install 'safegate[eval]'"


def check_plot_dependencies(option: str = "--no-plots") -> None:
    """Raise one-line `ImportError` naming the fix if matplotlib cannot be imported (checked before any work)."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
    except ImportError as err:
        raise ImportError(
            f"the report's plots need matplotlib ({type(err).__name__}: {err}); {PLOTS_EXTRA}, or pass {option}."
        ) from None


def figure(width: float = 5.0, height: float = 4.0) -> tuple[Any, Any]:
    """A figure on its own Agg canvas (no pyplot state) and its one axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def roc_plot(path: str | Path, scores: Sequence[float], labels: Sequence[int | bool]) -> None:
    """ROC curve of `scores` (harmful = 1) with the chance diagonal."""
    fig, ax = figure()
    fpr, tpr = roc_curve(scores, labels)
    auc = auroc(scores, labels)
    ax.plot(fpr, tpr, lw=2, label=f"gate p(unsafe), AUROC = {auc:.3f}" if auc is not None else "gate p(unsafe)")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false-positive rate (benign flagged)",
           ylabel="true-positive rate (harmful flagged)", title="Gate ROC")  # fmt: skip
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(str(path))


def score_histogram(path: str | Path, scores: Sequence[float], labels: Sequence[int | bool]) -> None:
    """Histograms of p(unsafe) for harmful and benign requests (densities, so unequal counts compare)."""
    fig, ax = figure()
    bins = [i / 20 for i in range(21)]
    harmful = [s for s, y in zip(scores, labels) if y]
    benign = [s for s, y in zip(scores, labels) if not y]
    if benign:
        ax.hist(benign, bins=bins, alpha=0.6, density=True, label=f"benign (n={len(benign)})", color="tab:blue")
    if harmful:
        ax.hist(harmful, bins=bins, alpha=0.6, density=True, label=f"harmful (n={len(harmful)})", color="tab:red")
    ax.set(xlim=(0, 1), xlabel="gate p(unsafe)", ylabel="density (area 1 per label)", title="Gate scores by label")
    ax.legend(loc="upper center")
    fig.tight_layout()
    fig.savefig(str(path))


def asr_plot(path: str | Path, results: Sequence[dict[str, Any]]) -> None:
    """Grouped bars: ASR of the base and the gated model per (dataset, attack) row with harmful requests."""
    rows = [r for r in results if r.get("n_harmful") and r.get("asr") is not None]
    fig, ax = figure(max(5.0, 0.9 * len(rows) + 2), 4.0)
    names = [f"{r['dataset']}\n{r['attack']}" for r in rows]
    x = list(range(len(rows)))
    for offset, key, label, color in ((-0.2, "base_asr", "base", "tab:grey"), (0.2, "asr", "gated", "tab:green")):
        values = [100 * (r[key] or 0.0) for r in rows]
        errors = [[0.0] * len(rows), [0.0] * len(rows)]
        for i, r in enumerate(rows):
            ci = r.get(f"{key}_ci")
            if ci:
                errors[0][i] = max(0.0, values[i] - 100 * ci[0])
                errors[1][i] = max(0.0, 100 * ci[1] - values[i])
        ax.bar([i + offset for i in x], values, width=0.4, label=label, color=color, yerr=errors, capsize=3)
    ax.set_xticks(x, names, fontsize=8)
    ax.set(ylim=(0, 105), ylabel="attack success rate (%)", title="ASR per attack: base vs gated")
    ax.legend()
    fig.tight_layout()
    fig.savefig(str(path))


def threshold_sweep_plot(
    path: str | Path, rows: Sequence[Row], shipped: float | None = None, title: str = "What each threshold gives"
) -> None:
    """Gated ASR (harmful rows, solid) and refusal rate (benign rows, dashed) against the threshold, on a logit axis
    (scores crowd near 0 and 1), with the shipped threshold marked."""
    points = sweep(rows)
    logit = [_logit(p.threshold) for p in points]
    named = groups(rows)
    fig, ax = figure(7.0, 4.5)
    for name in sorted(named, key=lambda n: (not named[n][0], n)):
        values = [100 * p.rates.get(name, math.nan) for p in points]
        style = "-" if named[name][0] else "--"
        ax.step(logit, values, where="pre", ls=style, lw=1.5, label=name)
    if shipped is not None:
        ax.axvline(_logit(shipped), color="black", lw=1, label=f"shipped threshold {shipped:.6g}")
    ax.set(ylim=(-2, 102), xlabel="threshold, logit of p(unsafe)",
           ylabel="gated ASR (solid) / refusal rate (dashed), %", title=title)  # fmt: skip
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(str(path))


def _logit(p: float, eps: float = 1e-6) -> float:
    p = min(max(p, eps), 1 - eps)
    return math.log(p / (1 - p))


def write_plots(
    folder: Path,
    scores: Sequence[float],
    labels: Sequence[int | bool],
    results: Sequence[dict],
    responses: Sequence[dict] = (),
    threshold: float | None = None,
) -> list[str]:
    """Write every plot that has data into `folder`; returns the file names written. `responses` (responses.jsonl
    rows) and the shipped `threshold` give the threshold sweep, drawn when every row has a gate score."""
    written = []
    if scores and len(set(bool(y) for y in labels)) == 2:
        roc_plot(folder / "roc.png", scores, labels)
        written.append("roc.png")
    if scores:
        score_histogram(folder / "score_hist.png", scores, labels)
        written.append("score_hist.png")
    if any(r.get("n_harmful") and r.get("asr") is not None for r in results):
        asr_plot(folder / "asr_by_attack.png", results)
        written.append("asr_by_attack.png")
    if responses and all(scored(r) for r in responses):
        threshold_sweep_plot(folder / "threshold_sweep.png", responses, threshold)
        written.append("threshold_sweep.png")
    return written
