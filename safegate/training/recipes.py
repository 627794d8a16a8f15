"""Training recipes: one YAML file says which model, gate, data, objective and Trainer settings to use.

Sections (every key is checked; an unknown key is named together with the valid ones):

    model:    name (anything `safegate.load_model` accepts), dtype, device, model_class, revision
    gate:     `safegate.GateConfig` fields
    data:     dir, harmful, benign, train, eval, max_harmful, max_benign, eval_size, seed, refusals,
              refusal_system_prompt, refusal_max_new_tokens, max_length
    method:   casa | token_only | ssft           beta: 0.5        aux_weight: 0.0        gate_lr: null
    fit_gate: enabled, epochs, lr, batch_size, train_token_rows, data   (gate-only warm start, method casa; data:
              more record files it fits on, never LoRA)
    calibrate: balanced | data, target_fpr, min_recall   (after training, the p(unsafe) threshold stored in the
              bundle: the one that best separates the training prompts, or the one flagging <= target_fpr of the
              benign prompts in the held-out files `data`, kept low enough to flag min_recall of the harmful
              training prompts)
    training: `transformers.TrainingArguments` fields
    output:   bundle (folder for `gated.save_bundle`; the trainable state when bundles are unavailable)

`--set section.key=value` overrides (YAML-parsed values) are applied before validation. Relative data paths start
at `data.dir` (default `$SAFEGATE_DATA`, else `../shared/data` next to the checkout); other paths at the working
directory.

Example:
    >>> recipe = parse_recipe({"model": {"name": "tiny:qwen2"}, "training": {"max_steps": 5}},
    ...                       overrides=["beta=0.7", "training.learning_rate=1e-3"])
    >>> recipe.beta, recipe.training["learning_rate"], recipe.model.name
    (0.7, 0.001, 'tiny:qwen2')
    >>> parse_recipe({"model": {"name": "tiny:qwen2"}, "trainig": {}})
    Traceback (most recent call last):
    ...
    ValueError: recipe: unknown key 'trainig' at the top level; valid keys: aux_weight, beta, calibrate, data, \
fit_gate, gate, gate_lr, method, model, output, training
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from safegate._lazy import lazy_attributes
from safegate.data.io import DataFileError, read_utf8
from safegate.modeling.config import GateConfig
from safegate.training.collate import METHODS


@dataclass
class ModelSection:
    """`model:` — what to load. `model_class` (a transformers class name or `pkg.module:Class`) overrides the
    architecture spec's class, e.g. `Qwen2_5OmniThinkerForConditionalGeneration` for a full Omni checkpoint."""

    name: str
    dtype: str | None = None
    device: str | None = None
    model_class: str | None = None
    revision: str | None = None


@dataclass
class DataSection:
    """`data:` — where records come from (see `safegate.data.build`)."""

    dir: str | None = None
    harmful: list[str] = field(default_factory=lambda: ["harmful/advbench.jsonl"])
    benign: list[str] = field(default_factory=lambda: ["benign/alpaca_seed_tasks.jsonl"])
    train: list[str] | None = None
    eval: list[str] | None = None
    max_harmful: int | None = None
    max_benign: int | None = None
    eval_size: float | int = 0.1
    seed: int = 0
    refusals: str = "template"
    refusal_system_prompt: str | None = None
    refusal_max_new_tokens: int = 80
    max_length: int | None = 1024


@dataclass
class FitGateSection:
    """`fit_gate:` — gate-only warm start before LoRA training (method `casa`). `data`: files of more records the
    warm start also fits on (labels only, no responses; never LoRA's): the gate is cheap to fit on many prompts,
    LoRA is not, and more prompts per source is what made the gate generalize (docs/generalization.md)."""

    enabled: bool = False
    epochs: int = 30
    lr: float = 3e-3
    batch_size: int = 32
    train_token_rows: bool = False
    data: list[str] | None = None


@dataclass
class CalibrateSection:
    """`calibrate:` — after training, set the gate's p(unsafe) threshold (saved in the bundle). `balanced: true`:
    the threshold with the highest balanced accuracy on the training prompts (`fit_balanced_threshold`; corrects
    the shift joint training gives every score). `data`: files of held-out records; the threshold flags at most
    `target_fpr` of their benign prompts (`calibrate_threshold`), capped so that at least `min_recall` of their
    harmful prompts (none there: of the harmful training prompts) stay flagged (`null`: no cap). Neither: the gate
    config's (default: argmax)."""

    balanced: bool = False
    data: list[str] | None = None
    target_fpr: float = 0.05
    min_recall: float | None = 0.9  # with `data`: the threshold keeps this share of its (else the training) harmful


@dataclass
class OutputSection:
    """`output:` — where the trained gate goes."""

    bundle: str | None = None


@dataclass
class Recipe:
    """A validated training recipe."""

    model: ModelSection
    gate: dict[str, Any] = field(default_factory=dict)
    data: DataSection = field(default_factory=DataSection)
    method: str = "casa"
    beta: float = 0.5
    aux_weight: float = 0.0
    gate_lr: float | None = None
    fit_gate: FitGateSection = field(default_factory=FitGateSection)
    calibrate: CalibrateSection = field(default_factory=CalibrateSection)
    training: dict[str, Any] = field(default_factory=dict)
    output: OutputSection = field(default_factory=OutputSection)
    path: str | None = None

    def gate_config(self) -> GateConfig:
        return GateConfig.from_dict(self.gate)


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-3` as a float (YAML 1.2 style), as people write learning rates."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


_SECTIONS = {
    "model": ModelSection, "data": DataSection, "fit_gate": FitGateSection, "calibrate": CalibrateSection,
    "output": OutputSection,
}  # fmt: skip
_TOP_LEVEL = sorted(f.name for f in dataclasses.fields(Recipe) if f.name != "path")


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None) -> Recipe:
    """Read, override (`["training.max_steps=50", ...]`) and validate a YAML recipe."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {str(path)!r} does not exist.")
    try:
        text = read_utf8(path)
    except DataFileError as err:
        raise ValueError(f"recipe {err}") from None
    try:
        raw = _yaml(text)
    except yaml.YAMLError as err:
        raise ValueError(f"recipe {str(path)!r} is not valid YAML: {err}") from err
    return parse_recipe(raw if raw is not None else {}, overrides=overrides, where=str(path))


def parse_recipe(raw: Any, overrides: list[str] | None = None, where: str = "recipe") -> Recipe:
    """Validate a recipe given as a dict (after applying `overrides`)."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: a recipe must be a mapping of sections, got {type(raw).__name__}.")
    raw = apply_overrides(raw, overrides or [], where)
    unknown = sorted(set(raw) - set(_TOP_LEVEL))
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r} at the top level; valid keys: {', '.join(_TOP_LEVEL)}")
    if "model" not in raw:
        raise ValueError(f"{where}: missing section 'model' (at least `model: {{name: ...}}`).")
    values: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        if name in raw:
            values[name] = _section(cls, raw[name], name, where)
    for name in ("gate", "training"):
        section = raw.get(name) or {}
        if not isinstance(section, dict):
            raise ValueError(f"{where}: section {name!r} must be a mapping, got {type(section).__name__}.")
        values[name] = dict(section)
    for name in ("method", "beta", "aux_weight", "gate_lr"):
        if name in raw:
            values[name] = raw[name]
    recipe = Recipe(**values, path=where)
    _check_values(recipe, where)
    return recipe


def apply_overrides(raw: dict[str, Any], overrides: list[str], where: str = "recipe") -> dict[str, Any]:
    """Apply `key.path=value` overrides (values parsed as YAML) to a copy of `raw`.

    Example:
        >>> apply_overrides({"training": {"max_steps": 5}}, ["training.max_steps=50", "method=ssft"])
        {'training': {'max_steps': 50}, 'method': 'ssft'}
    """
    import copy

    out = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. `--set training.max_steps=50`.")
        try:
            value = _yaml(text) if text.strip() else None
        except yaml.YAMLError as err:
            raise ValueError(f"--set {item!r}: the value is not valid YAML ({err}).") from err
        parts = key.strip().split(".")
        node = out
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ValueError(f"--set {item!r}: {'.'.join(parts[: depth + 1])!r} is not a section.")
            node = child
        node[parts[-1]] = value
    return out


def _section(cls: type, raw: Any, name: str, where: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: section {name!r} must be a mapping, got {type(raw).__name__}.")
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(valid))
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r} in section {name!r}; valid keys: {', '.join(valid)}")
    for key, value in raw.items():
        if isinstance(value, str) and _accepts(hints[key], list) and not _accepts(hints[key], str):
            raw = {**raw, key: [value]}  # a single path where a list is expected
            value = raw[key]
        if not _matches(value, hints[key]):
            raise ValueError(
                f"{where}: {name}.{key} must be {_describe(hints[key])}, got {value!r} ({type(value).__name__})."
            )
    missing = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING and f.name not in raw]  # fmt: skip
    if missing:
        raise ValueError(f"{where}: section {name!r} needs {missing[0]!r}.")
    return cls(**raw)


def _check_values(recipe: Recipe, where: str) -> None:
    if recipe.method not in METHODS:
        raise ValueError(f"{where}: method must be one of {', '.join(METHODS)}, got {recipe.method!r}.")
    for name, low, high in (("beta", 0.0, 1.0), ("aux_weight", 0.0, float("inf"))):
        value = getattr(recipe, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise ValueError(f"{where}: {name} must be a number in [{low}, {high}], got {value!r}.")
    if recipe.gate_lr is not None and (
        isinstance(recipe.gate_lr, bool) or not isinstance(recipe.gate_lr, (int, float))
    ):
        raise ValueError(f"{where}: gate_lr must be a number or null, got {recipe.gate_lr!r}.")
    try:
        recipe.gate_config()
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: section 'gate': {err}") from err
    from transformers import TrainingArguments

    valid = sorted(f.name for f in dataclasses.fields(TrainingArguments) if f.init)
    unknown = sorted(set(recipe.training) - set(valid))
    if unknown:
        raise ValueError(
            f"{where}: unknown key {unknown[0]!r} in section 'training'; valid keys are the fields of "
            f"transformers.TrainingArguments (e.g. {', '.join(k for k in _COMMON_TRAINING if k in valid)})."
        )
    if recipe.data.refusals not in ("template", "generate"):
        raise ValueError(f"{where}: data.refusals must be 'template' or 'generate', got {recipe.data.refusals!r}.")
    fpr = recipe.calibrate.target_fpr
    if not 0.0 <= fpr < 1.0:
        raise ValueError(f"{where}: calibrate.target_fpr must be a share in [0, 1), got {fpr!r}; e.g. 0.05.")
    recall = recipe.calibrate.min_recall
    if recall is not None and not 0.0 < recall <= 1.0:
        raise ValueError(f"{where}: calibrate.min_recall must be a share in (0, 1] or null, got {recall!r}; e.g. 0.9.")
    if recipe.calibrate.balanced and recipe.calibrate.data:
        raise ValueError(f"{where}: calibrate.balanced and calibrate.data are two rules for one threshold; keep one.")
    size = recipe.data.eval_size
    if isinstance(size, bool) or size < 0 or (isinstance(size, float) and size >= 1):
        raise ValueError(f"{where}: data.eval_size must be a count >= 0 or a fraction in [0, 1), got {size!r}.")


_COMMON_TRAINING = (
    "output_dir", "max_steps", "num_train_epochs", "learning_rate", "per_device_train_batch_size",
    "gradient_accumulation_steps", "bf16", "logging_steps", "save_steps", "eval_strategy", "report_to",
)  # fmt: skip


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _accepts(hint: Any, kind: type) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(arg, kind) for arg in typing.get_args(hint))
    return hint is kind or origin is kind


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if origin is list:
        return f"a list of {_describe(typing.get_args(hint)[0])}"
    return getattr(hint, "__name__", str(hint))


# Running a recipe lives in `safegate.training.recipe_run`; its names still resolve here.
__getattr__ = lazy_attributes(__name__, {name: "safegate.training.recipe_run" for name in (
    "calibration_records", "load_recipe_model", "recipe_records", "run_recipe")})  # fmt: skip
