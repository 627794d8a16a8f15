"""Running a validated recipe: load its model, build its records, train, calibrate the threshold, save the bundle.

`safegate train RECIPE` and `safegate demo` call `run_recipe`; the schema (`Recipe`, `load_recipe`) is
`safegate.training.recipes`.

Example:
    >>> from safegate.training.recipes import parse_recipe
    >>> recipe = parse_recipe({"model": {"name": "tiny:qwen2"}, "data": {"train": ["records.jsonl"]}})
    >>> calibration_records(recipe, [])  # no `calibrate.data`: nothing to check
    []
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safegate.training.recipes import ModelSection, Recipe

__all__ = ["calibration_records", "load_recipe_model", "recipe_records", "run_recipe"]


def load_recipe_model(section: ModelSection) -> tuple[Any, Any]:
    """`(model, processor)` for the `model:` section (`model_class` wins over the architecture spec)."""
    from safegate.backbones.load import load_model

    if section.model_class is None or section.name.startswith(("tiny:", "builtin:")):
        kwargs = {"revision": section.revision} if section.revision else {}
        return load_model(section.name, dtype=section.dtype, device=section.device, **kwargs)
    import transformers

    from safegate.backbones.load import DTYPES, import_object, load_processor

    cls = (
        import_object(section.model_class)
        if ":" in section.model_class
        else getattr(transformers, section.model_class, None)
    )
    if cls is None:
        raise ValueError(f"model.model_class: transformers has no class {section.model_class!r}.")
    kwargs = {"revision": section.revision} if section.revision else {}
    if section.dtype is not None:
        if section.dtype not in DTYPES:
            raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {section.dtype!r}.")
        kwargs["dtype"] = DTYPES[section.dtype]
    model = cls.from_pretrained(section.name, **kwargs)
    if section.device:
        model = model.to(section.device)
    processor = load_processor(section.name, **({"revision": section.revision} if section.revision else {}))
    return model.eval(), processor


def recipe_records(recipe: Recipe, model: Any = None, processor: Any = None) -> tuple[list[dict], list[dict] | None]:
    """`(train, eval)` records of a recipe: ready-made files (`data.train`) or built from harmful/benign sources."""
    from safegate.data.build import build_records, split_records
    from safegate.data.records import load_records
    from safegate.data.refusals import REFUSAL_SYSTEM_PROMPT

    data = recipe.data
    if data.train:
        records = [r for source in data.train for r in load_records(_data_path(source, data.dir))]
    else:
        kwargs: dict[str, Any] = {}
        if data.refusals == "generate":
            kwargs = {
                "system_prompt": data.refusal_system_prompt or REFUSAL_SYSTEM_PROMPT,
                "max_new_tokens": data.refusal_max_new_tokens,
            }
        records = build_records(
            data.dir,
            harmful=data.harmful,
            benign=data.benign,
            max_harmful=data.max_harmful,
            max_benign=data.max_benign,
            seed=data.seed,
            refusals=data.refusals,
            model=model,
            tokenizer=processor,
            **kwargs,
        )
    if data.eval:
        return records, [r for source in data.eval for r in load_records(_data_path(source, data.dir))]
    if data.eval_size:
        return split_records(records, data.eval_size, seed=data.seed)
    return records, None


def calibration_records(recipe: Recipe, train_records: list[dict]) -> list[dict]:
    """The records of `calibrate.data` (empty without it): benign ones (required) and any harmful ones; none may be
    a training prompt."""
    if not recipe.calibrate.data:
        return []
    from safegate.data.leakage import check_disjoint

    records = _prompt_records(recipe.calibrate.data, recipe.data.dir)
    if not any(r["label"] == "safe" for r in records):
        raise ValueError(
            f"calibrate.data {recipe.calibrate.data!r} holds no benign (`label: safe`) records; the threshold is "
            "calibrated on benign prompts: add some, or remove the `calibrate` section."
        )
    check_disjoint(train_records, records, eval_name="calibrate.data")  # trained prompts would score optimistically
    return records


def _prompt_records(sources: list[str], data_dir: str | None) -> list[dict]:
    """The records (responses optional) of every file in `sources`, relative paths starting at `data_dir`."""
    from safegate.data.records import load_records

    return [r for source in sources for r in load_records(_data_path(source, data_dir), require_response=False)]


def warm_start_records(recipe: Recipe, held_out: list[dict]) -> list[dict]:
    """The records of `fit_gate.data` (empty without it); none may be a held-out (evaluation or calibration) prompt."""
    if not recipe.fit_gate.data:
        return []
    if not recipe.fit_gate.enabled:
        raise ValueError(
            f"fit_gate.data {recipe.fit_gate.data!r} is set but fit_gate.enabled is false: the records would not "
            "be used. Set fit_gate.enabled: true, or remove fit_gate.data."
        )
    from safegate.data.leakage import check_disjoint

    records = _prompt_records(recipe.fit_gate.data, recipe.data.dir)
    if held_out:
        check_disjoint(records, held_out, train_name="fit_gate.data")  # a held-out prompt must not train the gate
    return records


def run_recipe(recipe: Recipe, *, resume_from_checkpoint: str | bool | None = None) -> dict[str, Any]:
    """Load the model, build the data, attach the gate, (warm-start and) train, save the bundle; return stats."""
    import safegate
    from safegate.training.outputs import check_recipe_outputs
    from safegate.training.state import save_trainable_state
    from safegate.training.trainer import DEFAULT_ARGS, train

    check_recipe_outputs(recipe, DEFAULT_ARGS["output_dir"])  # every output path, before the model loads
    model, processor = load_recipe_model(recipe.model)
    train_records, eval_records = recipe_records(recipe, model, processor)
    calibration = calibration_records(recipe, train_records)  # checked before training, not after
    warm_records = warm_start_records(recipe, calibration + list(eval_records or []))
    gated = safegate.attach(model, processor, recipe.gate_config())
    training = dict(recipe.training)
    resume = resume_from_checkpoint or training.pop("resume_from_checkpoint", None)
    warm: bool | dict[str, Any] = False
    if recipe.fit_gate.enabled:
        warm = {
            "epochs": recipe.fit_gate.epochs,
            "lr": recipe.fit_gate.lr,
            "batch_size": recipe.fit_gate.batch_size,
            "train_token_rows": recipe.fit_gate.train_token_rows,
        }
        if warm_records:
            warm["data"] = warm_records
    stats = train(
        gated,
        train_records,
        eval_records,
        beta=recipe.beta,
        method=recipe.method,
        args=training,
        aux_weight=recipe.aux_weight,
        gate_lr=recipe.gate_lr,
        max_length=recipe.data.max_length,
        warm_start=warm,
        resume_from_checkpoint=resume,
    )
    if calibration:
        from safegate.training.calibrate import calibrate

        recall = recipe.calibrate.min_recall
        held_harmful = [r for r in calibration if r["label"] == "unsafe"]
        # the cap keeps `min_recall` of calibrate.data's harmful prompts (never trained on), else of the training ones
        harmful = (held_harmful or train_records) if recall else None
        result = calibrate(gated, calibration, recipe.calibrate.target_fpr, harmful=harmful, min_recall=recall or 1.0)
        stats["threshold"] = result.threshold
        stats["calibration_prompts"] = result.n_benign
        stats["recall_cap_on"] = ("calibrate.data" if held_harmful else "training") if recall else None
        stats["calibration"] = result
    elif recipe.calibrate.balanced:
        from safegate.training.calibrate import fit_balanced_threshold

        stats["threshold"] = fit_balanced_threshold(gated, train_records)
        stats["calibration_prompts"] = sum(bool(r.get("gate", True)) for r in train_records)
    if recipe.output.bundle and _is_main_process():
        try:
            import safegate.hub.bundle  # noqa: F401 - written by another part of the library; optional here
        except ImportError:
            stats["bundle"] = save_trainable_state(gated, recipe.output.bundle)
            stats["bundle_kind"] = "trainable-state"
        else:
            gated.save_bundle(recipe.output.bundle)
            stats["bundle"] = recipe.output.bundle
            stats["bundle_kind"] = "bundle"
    stats["gated"] = gated
    return stats


def _is_main_process() -> bool:
    """Only one process of a distributed run writes the bundle."""
    from accelerate import PartialState

    return PartialState().is_main_process


def _data_path(source: str, data_dir: str | None) -> str:
    path = Path(source).expanduser()
    if path.is_absolute() or path.exists():
        return str(path)
    from safegate.data.io import require_data_folder

    return str(require_data_folder(data_dir) / path)
