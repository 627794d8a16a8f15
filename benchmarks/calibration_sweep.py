"""Would another calibration target have met the demo's targets? Re-calibrate stored demo gates, read the outcome.

`safegate demo` sets each gate's threshold so that at most `calibrate.target_fpr` (3 %) of its held-back benign
calibration prompts are flagged. This benchmark loads the bundles of a finished demo run (`demo-out/` or, with
`--seeds`, `demo-out/seed-*/`), re-calibrates each at other target rates on the same `data/calibration.jsonl`
(`safegate.training.calibrate.calibrate`; with `--recalls`, capped so that each given share of the file's harmful
prompts stays flagged), and reads what the evaluation would have given at each threshold from the
stored answers (`safegate.evaluation.threshold_sweep`: no generation; a verdict turned safe takes the base answer,
exact with `safe_answer: base`; one turned unsafe counts as a refusal). Per seed and rate: the threshold, the
XSTest-safe and Alpaca over-refusal changes, the lowest ASR reduction over the trained sources' attacks, and whether
all three targets hold.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/calibration_sweep.py demo-out --fprs 0,0.015,0.03,0.05
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/calibration_sweep.py demo-out --fprs 0,0.03 --recalls 0.9,0.95

Prints a markdown table; `--out FILE.json` keeps the rows. About a minute per seed on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from safegate.demo_report import TARGETS
from safegate.demo_sweep import harmful_names, meets_over_refusal_targets, over_refusal
from safegate.evaluation.threshold_sweep import base_rates, reductions, sweep


def run_folders(run: Path) -> list[Path]:
    """The per-seed folders of a demo run (`seed-*/`), or the run itself when it trained one seed."""
    seeds = sorted(run.glob("seed-*"), key=lambda p: int(p.name.split("-")[1]))
    folders = seeds or [run]
    missing = [f for f in folders if not (f / "bundle").is_dir() or not (f / "report" / "responses.jsonl").is_file()]
    if missing:
        raise FileNotFoundError(f"{missing[0]}: no bundle/ or report/responses.jsonl; pass a finished demo's --out.")
    return folders


def outcome(rows: list[dict[str, Any]], threshold: float) -> dict[str, Any]:
    """The demo's target numbers at `threshold`, read from stored answers."""
    base = base_rates(rows)
    (point,) = sweep(rows, [threshold])
    extra = over_refusal(point, base)
    reduction = min(reductions(point, base, harmful_names(rows)["trained"]).values())
    met = meets_over_refusal_targets(extra) and reduction >= TARGETS["asr_reduction"]
    return {"threshold": threshold, "xstest_pp": extra["xstest"], "alpaca_pp": extra["alpaca"],
            "lowest_reduction": reduction, "inferred_answers": point.inferred, "targets_met": met}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a finished `safegate demo --out` folder")
    parser.add_argument("--fprs", default="0,0.015,0.03,0.05", help="comma list of calibration target rates")
    parser.add_argument("--recalls", default="", help="comma list of recall caps on the file's harmful prompts")
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--out", type=Path, help="write the rows as JSON")
    args = parser.parse_args(argv)
    fprs = [float(x) for x in args.fprs.split(",")]
    recalls = [None] + [float(x) for x in args.recalls.split(",") if x]
    from safegate.backbones.load import load_model
    from safegate.hub.bundle import load_bundle
    from safegate.training.calibrate import calibrate

    calibration = [json.loads(line) for line in (args.run / "data" / "calibration.jsonl").read_text().splitlines()]
    harmful = [r for r in calibration if r["label"] == "unsafe"]
    if len(recalls) > 1 and not harmful:
        raise ValueError(
            f"--recalls needs harmful (label: unsafe) prompts in {args.run / 'data' / 'calibration.jsonl'}."
        )
    results = []
    for folder in run_folders(args.run):
        model, tok = load_model(args.model, dtype="float32")
        gated = load_bundle(model, tok, folder / "bundle")
        rows = [json.loads(line) for name in ("report", "report-untrained") if (folder / name).is_dir()
                for line in (folder / name / "responses.jsonl").read_text().splitlines()]  # fmt: skip
        for fpr in fprs:
            for recall in recalls:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # a binding cap warns; the table says it
                    cap = {"harmful": harmful, "min_recall": recall} if recall else {}
                    threshold = calibrate(gated, calibration, fpr, **cap).threshold
                results.append({"run": folder.name, "target_fpr": fpr, "min_recall": recall,
                                **outcome(rows, threshold)})  # fmt: skip
        del gated, model
    header = ["seed folder", "target FPR", "recall cap", "threshold", "XSTest-safe", "Alpaca", "lowest ASR reduction",
              "all three met"]  # fmt: skip
    print("| " + " | ".join(header) + " |\n" + "|---" * len(header) + "|")
    for r in results:
        cap = "—" if r["min_recall"] is None else f"{100 * r['min_recall']:.1f} %"
        cells = [r["run"], f"{100 * r['target_fpr']:.1f} %", cap, f"{r['threshold']:.6g}",
                 f"{100 * r['xstest_pp']:+.1f} pp", f"{100 * r['alpaca_pp']:+.1f} pp",
                 f"{100 * r['lowest_reduction']:.1f} %", "yes" if r["targets_met"] else "no"]  # fmt: skip
        print("| " + " | ".join(cells) + " |")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    torch.set_num_threads(2)
    sys.exit(main())
