"""`safegate train RECIPE [--set key=value ...]`: train a gate from a YAML recipe (also `python -m safegate train`).

Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser()
    >>> register(parser.add_subparsers())
    >>> args = parser.parse_args(["train", "recipes/tiny_cpu.yaml", "--set", "training.max_steps=5"])
    >>> args.recipe, args.overrides
    ('recipes/tiny_cpu.yaml', ['training.max_steps=5'])
"""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a safety gate from a YAML recipe",
        description="Train a CASA safety gate (LoRA + gate + token rows) as a YAML recipe describes.",
    )
    parser.add_argument("recipe", help="recipe file, e.g. recipes/tiny_cpu.yaml")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe value (YAML-parsed), e.g. --set training.max_steps=50; repeatable",
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="CHECKPOINT",
        help="resume from the last checkpoint in training.output_dir, or from CHECKPOINT",
    )
    parser.add_argument("--dry-run", action="store_true", help="validate the recipe and the data, then stop")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from safegate.training.outputs import check_recipe_outputs
    from safegate.training.recipe_run import calibration_records, recipe_records, run_recipe
    from safegate.training.recipes import load_recipe
    from safegate.training.trainer import DEFAULT_ARGS

    recipe = load_recipe(args.recipe, overrides=args.overrides)
    check_recipe_outputs(recipe, DEFAULT_ARGS["output_dir"])  # a dry run reports it too
    if args.dry_run:
        train_records, eval_records = recipe_records(recipe) if recipe.data.refusals == "template" else ([], None)
        print(f"recipe {args.recipe}: valid (model {recipe.model.name}, method {recipe.method}, beta {recipe.beta})")
        if recipe.data.refusals == "template":
            print(f"data: {len(train_records)} training records, {len(eval_records or [])} held out")
            if recipe.calibrate.data:
                records = calibration_records(recipe, train_records)
                n, harmful = sum(r["label"] == "safe" for r in records), sum(r["label"] == "unsafe" for r in records)
                cap = f", {harmful} harmful (recall cap)" if harmful else ""
                print(
                    f"calibration: {n} benign prompts{cap}, target false-positive rate {recipe.calibrate.target_fpr}"
                )
        return 0
    stats = run_recipe(recipe, resume_from_checkpoint=args.resume)
    last = stats["last_log"]
    summary = {
        "steps": stats["global_step"],
        "train_loss": round(stats["train_loss"], 4),
        "gate_loss": last.get("gate_loss"),
        "response_loss": last.get("response_loss"),
        "gate_accuracy": last.get("gate_accuracy"),
        "n_train": stats["n_train"],
        "n_eval": stats["n_eval"],
    }
    summary.update({k: round(v, 4) for k, v in stats["eval"].items() if k.startswith("eval_") and "gate" in k})
    if stats.get("warm_start"):
        summary["warm_start_accuracy"] = round(stats["warm_start"].get("train_accuracy", 0.0), 4)
    if "threshold" in stats:
        summary["threshold"] = stats["threshold"]  # calibrated on `calibrate.data`, saved with the bundle
    if "calibration" in stats:  # which rule set it: the false-positive target, or the recall cap (it warned)
        result = stats["calibration"]
        summary["threshold_rule"] = "recall cap" if result.capped else "target_fpr"
        summary["calibration_benign_flagged"] = round(result.benign_flagged, 4)
        if (
            result.harmful_flagged is not None
        ):  # the recall cap's prompts: calibrate.data's harmful ones, else training's
            where = "calibration" if stats.get("recall_cap_on") == "calibrate.data" else "training"
            summary[f"{where}_harmful_flagged"] = round(result.harmful_flagged, 4)
    print("safegate train: " + json.dumps(summary))
    if stats.get("bundle"):
        print(f"safegate train: saved {stats['bundle_kind']} to {stats['bundle']}")
    return 0
