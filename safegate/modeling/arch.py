"""Where the parts of a backbone live: data-only specs from `adapters/*.toml`, generic discovery otherwise.

A spec names, relative to the module that is gated, the text decoder, its layer list and final norm, and the
LoRA target regex. Plain decoder-only models need no spec: `get_decoder()` and the embedding accessors find
everything.

Example:
    >>> from safegate.modeling.arch import resolve
    >>> from safegate.testing import tiny_model_and_tokenizer
    >>> model, _ = tiny_model_and_tokenizer("qwen2")
    >>> resolve(model).decoder_path
    'model'
"""

from __future__ import annotations

import importlib.resources
import re
import tomllib
from dataclasses import dataclass, field, fields
from functools import cache
from pathlib import Path
from typing import Any

from torch import nn

ADAPTERS_README = "adapters/README.md"
MODALITIES = ("text", "image", "audio", "video")
#: Inputs that carry images, audio or video; when one is present the spec's `required_inputs` must be too.
MULTIMODAL_INPUTS = (
    "pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "input_features",
    "feature_attention_mask", "image_sizes",
)  # fmt: skip


@dataclass(frozen=True)
class ArchSpec:
    """One architecture's layout, read from `adapters/<model_type>.toml` (schema: `adapters/README.md`)."""

    model_type: str
    unwrap: str | None = None
    decoder: str | None = None
    layers: str = "layers"
    norm: str = "norm"
    lora_target: str | None = None
    kwarg_prefix: str | None = None
    required_inputs: tuple[str, ...] = ()
    placeholders: dict[str, str] = field(default_factory=dict)
    modalities: tuple[str, ...] = ("text",)
    model_class: str | None = None
    notes: str = ""

    @classmethod
    def from_toml(cls, path: Path) -> ArchSpec:
        data = tomllib.loads(path.read_text())
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown spec field(s) {unknown}; the schema is in {ADAPTERS_README}.")
        if "model_type" not in data:
            raise ValueError(f"{path}: missing required field `model_type` (see {ADAPTERS_README}).")
        for key in ("required_inputs", "modalities"):
            if key in data:
                data[key] = tuple(data[key])
        spec = cls(**data)
        spec.validate(str(path))
        return spec

    def validate(self, where: str = "spec") -> None:
        """Check field values beyond their names (modalities known, each with its placeholder config field)."""
        unknown = sorted(set(self.modalities) - set(MODALITIES))
        if unknown or "text" not in self.modalities:
            raise ValueError(
                f"{where}: `modalities` must include 'text' and only name {list(MODALITIES)}, got "
                f"{list(self.modalities)} (see {ADAPTERS_README})."
            )
        keys = {f"{m}{suffix}" for m in MODALITIES[1:] for suffix in ("", "_start", "_end")}
        bad = sorted(set(self.placeholders) - keys)
        if bad:
            raise ValueError(f"{where}: unknown `placeholders` key(s) {bad}; allowed: {sorted(keys)}.")
        missing = [m for m in self.modalities if m != "text" and m not in self.placeholders]
        if missing:
            raise ValueError(
                f"{where}: modality {missing[0]!r} needs `placeholders.{missing[0]}` (the config field holding its "
                f"placeholder token id), see {ADAPTERS_README}."
            )


def specs_dir() -> Path:
    """Folder holding the TOML specs: `safegate/adapters` in a wheel, `<repo>/adapters` in a checkout."""
    packaged = Path(str(importlib.resources.files("safegate"))) / "adapters"
    if packaged.is_dir() and any(packaged.glob("*.toml")):
        return packaged
    return Path(__file__).resolve().parents[2] / "adapters"


@cache
def load_specs(folder: str | None = None) -> dict[str, ArchSpec]:
    """Every spec in `folder` (default `specs_dir()`), keyed by `model_type`."""
    root = Path(folder) if folder else specs_dir()
    specs = {}
    for path in sorted(root.glob("*.toml")):
        spec = ArchSpec.from_toml(path)
        specs[spec.model_type] = spec
    return specs


@dataclass
class ResolvedArch:
    """The live modules of one backbone that safegate touches."""

    spec: ArchSpec
    root: nn.Module
    decoder_path: str
    decoder: nn.Module
    layers: nn.ModuleList
    norm: nn.Module
    embed: nn.Embedding
    head: nn.Linear
    lora_target: str

    @property
    def tied(self) -> bool:
        """Tying is read from tensor identity, never from config flags."""
        return self.head.weight is self.embed.weight

    def tap_module(self, layer: int) -> nn.Module:
        """Module whose output feeds the gate: the final norm for `-1`, else decoder layer `layer`."""
        if layer == -1:
            return self.norm
        n = len(self.layers)
        if not -n <= layer < n:
            raise ValueError(f"`layer` must be -1 (final norm) or in [{-n}, {n - 1}] for this model, got {layer}.")
        return self.layers[layer]

    def module_name(self, module: nn.Module) -> str:
        for name, candidate in self.root.named_modules():
            if candidate is module:
                return name
        raise ValueError(f"module {type(module).__name__} is not inside the gated model")


def _get(module: nn.Module, path: str | None) -> Any:
    obj: Any = module
    for part in (path or "").split("."):
        if part:
            obj = getattr(obj, part)
    return obj


def check_required_inputs(spec: ArchSpec, inputs: dict[str, Any]) -> None:
    """Raise if multimodal `inputs` lack an input the spec requires (e.g. Qwen-VL's `mm_token_type_ids`).

    Text-only inputs need nothing extra. Without `mm_token_type_ids` Qwen2-VL raises deep inside its forward and
    Qwen2.5-VL silently falls back to 1-D positions, so both the gate and the answer would read wrong states.
    """
    if not any(inputs.get(k) is not None for k in MULTIMODAL_INPUTS):
        return
    missing = [k for k in spec.required_inputs if inputs.get(k) is None]
    if missing:
        raise ValueError(
            f"{spec.model_type!r} with image/video inputs also needs {missing}: pass everything the processor "
            "returned, or build it with safegate.data.multimodal.MultimodalInputBuilder."
        )


def model_type_of(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return str(getattr(config, "model_type", type(model).__name__))


def unwrap(model: nn.Module) -> nn.Module:
    """The module that generates text (e.g. Qwen2.5-Omni's `thinker`), per the spec; `model` itself otherwise."""
    spec = load_specs().get(model_type_of(model))
    if spec is not None and spec.unwrap:
        return _get(model, spec.unwrap)
    return model


def resolve(
    model: nn.Module, lora_target: str | None = None, lora_modules: tuple[str, ...] = ("q_proj", "v_proj")
) -> ResolvedArch:
    """Locate decoder, layers, final norm, embeddings and head of `model`; raise a clear error if impossible."""
    specs = load_specs()
    model_type = model_type_of(model)
    spec = specs.get(model_type, ArchSpec(model_type=model_type))
    root = _get(model, spec.unwrap) if spec.unwrap else model
    try:
        if spec.decoder is not None:
            decoder_path = spec.decoder
            decoder = _get(root, decoder_path)
        else:
            decoder = root.get_decoder()
            if decoder is root:
                raise AttributeError("get_decoder() returned the model itself")
            decoder_path = next(name for name, mod in root.named_modules() if mod is decoder)
        layers = _get(decoder, spec.layers)
        norm = _get(decoder, spec.norm)
        embed = root.get_input_embeddings()
        head = root.get_output_embeddings()
        if not isinstance(layers, nn.ModuleList) or head is None:
            raise AttributeError("no layer list or no output head")
    except (AttributeError, NotImplementedError, StopIteration) as err:
        supported = ", ".join(sorted(specs)) or "(none)"
        raise ValueError(
            f"safegate cannot find the text decoder of model_type {model_type!r} ({err}). Plain decoder-only "
            f"models are found automatically; specs exist for: {supported}. Add a spec as described in "
            f"{ADAPTERS_README}."
        ) from err
    target = lora_target or spec.lora_target or _default_lora_target(decoder_path, spec.layers, layers, lora_modules)
    return ResolvedArch(spec, root, decoder_path, decoder, layers, norm, embed, head, target)


def _default_lora_target(decoder_path: str, layers_attr: str, layers: nn.ModuleList, modules: tuple[str, ...]) -> str:
    """Regex over the Linear layers named in `modules` inside the decoder layers, and nothing outside them.

    Falls back to every Linear of the layer when none of `modules` exists (e.g. fused `c_attn` projections).
    """
    linear = sorted({name for name, mod in layers[0].named_modules() if isinstance(mod, nn.Linear)})
    suffixes = [name for name in linear if name.rsplit(".", 1)[-1] in modules] or linear
    if not suffixes:
        raise ValueError("no nn.Linear inside the decoder layers: set `lora_target` or `lora_r=0`.")
    prefix = ".".join(p for p in (decoder_path, layers_attr) if p)
    return rf"{re.escape(prefix)}\.\d+\.({'|'.join(re.escape(s) for s in suffixes)})"
