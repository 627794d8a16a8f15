"""Gate bundles: the small safetensors export of a trained gate, loaded strictly onto a matching backbone.

A bundle is a folder or a Hugging Face Hub repo (format and rules: `docs/bundle-format.md`):

    safegate_config.json               schema version, library versions, backbone fingerprint, GateConfig, recipe
    safegate.safetensors               gate weights (with the query) + the safety-token rows keyed by token string
    adapter/adapter_config.json        PEFT config: plain `PeftModel.from_pretrained` loads `adapter/`
    adapter/adapter_model.safetensors  LoRA weights + the token rows as PEFT stores them (never full matrices)
    README.md                          model card

Saving is atomic, loading is strict (`BundleMismatchError` names the field, the bundle's value and the model's),
and only JSON and safetensors are ever read: nothing is unpickled.

Example:
    >>> import tempfile, safegate
    >>> from safegate.testing import tiny_model_and_tokenizer
    >>> model, tok = tiny_model_and_tokenizer("qwen2")
    >>> gated = safegate.attach(model, tok, safegate.GateConfig(attention_dim=16, lora_r=4))
    >>> tmp = tempfile.TemporaryDirectory()
    >>> folder = gated.save_bundle(f"{tmp.name}/my-gate")
    >>> sorted(p.name for p in folder.iterdir())
    ['README.md', 'adapter', 'safegate.safetensors', 'safegate_config.json']
    >>> fresh, fresh_tok = tiny_model_and_tokenizer("qwen2")
    >>> reloaded = safegate.load_bundle(fresh, fresh_tok, folder)
    >>> inputs = tok(["How do I bake bread?"], return_tensors="pt")
    >>> bool(reloaded.classify(**inputs) == gated.classify(**inputs))
    True
    >>> tmp.cleanup()
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import shutil
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from huggingface_hub import ModelCard, ModelCardData, ModelHubMixin, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError
from peft import PeftConfig, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import save_file
from torch import nn

from safegate.hub.files import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_DIR,
    ADAPTER_WEIGHTS_NAME,
    BUNDLE_FILES,
    CARD_NAME,
    CHECKSUMMED,
    CONFIG_NAME,
    FINGERPRINT,
    FORMAT,
    PAPER_URL,
    REQUIRED_FILES,
    SCHEMA_VERSION,
    WEIGHTS_NAME,
    BundleError,
    BundleMismatchError,
    BundleNotFoundError,
    bundle_sizes,
    card_body,
    check_config,
    check_file,
    check_target,
    evaluation_rows,
    file_record,
    fsync_tree,
    read_json,
    read_safetensors,
    replace_dir,
    versions,
)
from safegate.modeling.arch import ResolvedArch, model_type_of, resolve
from safegate.modeling.config import GateConfig
from safegate.modeling.tokens import _check_protected, text_tokenizer, token_id

if TYPE_CHECKING:
    from safegate.modeling.model import SafeGateModel

__all__ = [
    "BUNDLE_FILES", "CONFIG_NAME", "SCHEMA_VERSION", "WEIGHTS_NAME", "BundleError", "BundleMismatchError",
    "BundleNotFoundError", "SafeGateBundle", "bundle_sizes", "load_bundle", "push_to_hub", "resolve_bundle",
    "save_bundle",
]  # fmt: skip

_PEFT_PREFIX = "base_model.model."
_DELTA = "trainable_tokens_delta"


class SafeGateBundle(
    ModelHubMixin,
    library_name="safegate",
    tags=["safegate", "safety", "casa", "lora", "peft"],
    paper_url=PAPER_URL,
):
    """The files of one gate bundle, in memory: build with `from_model` or `from_pretrained`, then `attach`.

    `save_pretrained`/`push_to_hub` come from `huggingface_hub.ModelHubMixin` (no root `config.json` is written;
    saving is atomic); `from_pretrained` resolves Hub repos with `snapshot_download` (revision, token, cache,
    offline mode) and validates every file.

    Args:
        config (`dict`): Content of `safegate_config.json`.
        tensors (`dict[str, torch.Tensor]`): Content of `safegate.safetensors` (`gate.*`, `tokens.<part>.<token>`).
        adapter_config (`peft.PeftConfig`): The PEFT adapter config.
        adapter_tensors (`dict[str, torch.Tensor]`): Content of `adapter/adapter_model.safetensors`.
    """

    def __init__(
        self,
        config: dict[str, Any],
        tensors: dict[str, torch.Tensor],
        adapter_config: PeftConfig,
        adapter_tensors: dict[str, torch.Tensor],
    ) -> None:
        self._hub_mixin_config = None  # the mixin must never write a root config.json
        self.config = check_config(config)
        self.tensors, self.adapter_config, self.adapter_tensors = tensors, adapter_config, adapter_tensors
        self.folder: Path | None = None
        self._check_tensors()

    # ------------------------------------------------------------------------------------------ accessors
    @property
    def gate_config(self) -> GateConfig:
        return GateConfig.from_dict(self.config["gate_config"])

    @property
    def backbone(self) -> dict[str, Any]:
        return self.config["backbone"]

    @property
    def payload_bytes(self) -> int:
        """Bytes of tensor data in both safetensors files (headers excluded)."""
        tensors = [*self.tensors.values(), *self.adapter_tensors.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def token_rows(self, part: str) -> torch.Tensor:
        """Rows `[safe, unsafe]` of `part` (`"embed"` or `"head"`), shape (2, hidden)."""
        cfg = self.gate_config
        return torch.stack([self.tensors[f"tokens.{part}.{t}"] for t in (cfg.safe_token, cfg.unsafe_token)])

    def _parts(self) -> dict[str, str]:
        """Token-row part -> module path inside the gated module (`head` only for untied heads)."""
        b = self.backbone
        return {"embed": b["embed_module"]} if b["tied"] else {"embed": b["embed_module"], "head": b["head_module"]}

    # ------------------------------------------------------------------------------------------- building
    @classmethod
    def from_model(
        cls, gated: SafeGateModel, recipe: str | None = None, evaluation: Mapping | Sequence | None = None
    ) -> SafeGateBundle:
        """Snapshot the trained parts of `gated` (on CPU): gate, token rows, LoRA; never full matrices."""
        gated._check_attached()
        if recipe is not None and not isinstance(recipe, str):
            raise ValueError(f"`recipe` must be a recipe name or path (str), got {type(recipe).__name__}.")
        arch, cfg = gated.arch, gated.gate_config
        rows = arch.embed.weight.shape[0]
        tensors = {f"gate.{k}": _cpu(v) for k, v in gated.gate.state_dict().items()}
        for part, layer in _token_layers(gated).items():
            delta = layer.trainable_tokens_delta["default"]
            for i, token in enumerate((cfg.safe_token, cfg.unsafe_token)):
                tensors[f"tokens.{part}.{token}"] = _cpu(delta[i])
        adapter = get_peft_model_state_dict(gated.peft_model, adapter_name="default", save_embedding_layers=False)
        adapter_tensors = {k: _cpu(v) for k, v in adapter.items()}
        full = [k for k, t in adapter_tensors.items() if "base_layer" in k or t.shape == arch.embed.weight.shape]
        if full:  # save_embedding_layers=False semantics, enforced
            raise RuntimeError(f"refusing to save {full}: bundles never hold full embedding or head matrices.")
        peft_config = copy.deepcopy(gated.peft_model.peft_config["default"])
        peft_config.inference_mode = True
        name = str(getattr(getattr(gated._original, "config", None), "name_or_path", "") or "")
        config = {
            "format": FORMAT,
            "schema_version": SCHEMA_VERSION,
            "versions": versions(),
            "method": {"name": "CASA", "paper": PAPER_URL},
            "backbone": {
                "model_type": model_type_of(gated._original),
                "gated_model_type": model_type_of(arch.root),
                "gated_module": arch.spec.unwrap or "",
                "name_or_path": name,
                "hidden_size": int(arch.embed.weight.shape[1]),
                "num_layers": len(arch.layers),
                "vocab_rows": int(gated._original_rows),
                "vocab_rows_gated": int(rows),
                "tied": bool(arch.tied),
                "embed_module": gated._embed_name,
                "head_module": gated._head_name,
                "dtype": str(arch.embed.weight.dtype).removeprefix("torch."),
            },
            "tokens": {
                "safe": cfg.safe_token,
                "unsafe": cfg.unsafe_token,
                "ids_at_save": {cfg.safe_token: gated.safe_token_id, cfg.unsafe_token: gated.unsafe_token_id},
            },
            "gate_config": cfg.to_dict() | {"lora_modules": list(cfg.lora_modules)},
            "threshold": cfg.threshold,
            "recipe": recipe,
            "evaluation": evaluation_rows(evaluation),
        }
        return cls(config, tensors, peft_config, adapter_tensors)

    # --------------------------------------------------------------------------------------------- saving
    def save_pretrained(  # type: ignore[override]
        self,
        save_directory: str | Path,
        *,
        config: Any = None,
        repo_id: str | None = None,
        push_to_hub: bool = False,
        model_card_kwargs: dict[str, Any] | None = None,
        **push_to_hub_kwargs: Any,
    ) -> str | None:
        """Write the bundle to `save_directory` atomically (see `ModelHubMixin.save_pretrained` for the rest).

        The files go to a temporary folder next to the target, which then replaces the target in one rename: a
        crash leaves either no bundle or the previous one, never half a bundle. An existing folder is only
        replaced if it is a bundle.
        """
        if config is not None:
            raise ValueError("`config` is not supported: a bundle never writes a root config.json (see CONFIG_NAME).")
        target = Path(os.path.abspath(save_directory))  # "." or "gate/" get a real name for the temp folder
        check_target(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:12]}"
        tmp.mkdir()
        try:
            super().save_pretrained(tmp, model_card_kwargs=model_card_kwargs)
            if (tmp / "config.json").exists():
                raise RuntimeError("a root config.json was written; bundles must not have one")
            fsync_tree(tmp)
            replace_dir(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.folder = target
        if push_to_hub:
            return self.push_to_hub(repo_id or target.name, model_card_kwargs=model_card_kwargs, **push_to_hub_kwargs)
        return None

    def _save_pretrained(self, save_directory: Path) -> None:
        (save_directory / ADAPTER_DIR).mkdir()
        save_file(self.tensors, str(save_directory / WEIGHTS_NAME), metadata={"format": "pt"})
        save_file(self.adapter_tensors, str(save_directory / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
        self.adapter_config.save_pretrained(str(save_directory / ADAPTER_DIR))
        files = {name: file_record(save_directory / name) for name in CHECKSUMMED}
        text = json.dumps(dict(self.config, files=files), indent=2, ensure_ascii=False)
        (save_directory / CONFIG_NAME).write_text(text + "\n", encoding="utf-8")

    def generate_model_card(self, *args: Any, **kwargs: Any) -> ModelCard:
        """The bundle's README.md: base model, method, recipe, sizes and the evaluation table when known."""
        data = ModelCardData(**self._hub_mixin_info.model_card_data.to_dict())
        base = self.backbone["name_or_path"]
        if re.fullmatch(r"[\w.-]+/[\w.-]+", base) and not os.path.exists(base):
            data.base_model = base
        return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{card_body(self.config, self.payload_bytes)}")

    # -------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        pretrained_model_name_or_path: str | Path,
        *,
        force_download: bool = False,
        token: str | bool | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        revision: str | None = None,
        **model_kwargs: Any,
    ) -> SafeGateBundle:
        """Read and validate a bundle from a folder or a Hub repo id (no root config.json is looked up)."""
        return cls._from_pretrained(
            model_id=str(pretrained_model_name_or_path),
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            local_files_only=local_files_only,
            token=token,
            **model_kwargs,
        )

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | Path | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        **model_kwargs: Any,
    ) -> SafeGateBundle:
        if model_kwargs:
            raise TypeError(f"unexpected argument(s) {sorted(model_kwargs)} for SafeGateBundle.from_pretrained.")
        folder = resolve_bundle(model_id, revision, token, cache_dir, local_files_only, force_download)
        missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
        if missing:
            raise BundleError(
                f"{folder} is not a complete safegate bundle: missing {missing}. Re-export it with "
                "`gated.save_bundle(...)` or re-download it."
            )
        config = read_json(folder / CONFIG_NAME)
        check_config(config)
        for name in CHECKSUMMED:
            check_file(folder, name, config["files"].get(name))
        adapter_config = read_json(folder / ADAPTER_CONFIG_NAME)
        try:
            peft_config = PeftConfig.from_peft_type(**adapter_config)
        except (TypeError, ValueError, KeyError) as err:
            raise BundleError(f"{folder / ADAPTER_CONFIG_NAME} is not a valid PEFT adapter config: {err}") from err
        bundle = cls(
            {k: v for k, v in config.items() if k != "files"},
            read_safetensors(folder / WEIGHTS_NAME),
            peft_config,
            read_safetensors(folder / ADAPTER_WEIGHTS_NAME),
        )
        bundle.folder = folder
        return bundle

    # ---------------------------------------------------------------------------------- checks and attach
    def _check_tensors(self) -> None:
        cfg, hidden = self.gate_config, self.backbone["hidden_size"]
        token_keys = {f"tokens.{part}.{t}" for part in self._parts() for t in (cfg.safe_token, cfg.unsafe_token)}
        missing = sorted(token_keys - set(self.tensors)) + (["gate.query"] if "gate.query" not in self.tensors else [])
        unexpected = sorted(k for k in set(self.tensors) - token_keys if not k.startswith("gate."))
        if missing or unexpected:
            raise BundleError(f"{WEIGHTS_NAME}: missing tensors {missing}, unexpected tensors {unexpected}.")
        bad = [k for k in [*token_keys, "gate.query"] if tuple(self.tensors[k].shape) != (hidden,)]
        if bad:
            raise BundleError(f"{WEIGHTS_NAME}: tensors {bad} do not have the backbone's hidden size {hidden}.")
        for part, module in self._parts().items():
            key = _delta_key(self.adapter_tensors, module)
            if key is None:
                raise BundleError(f"{ADAPTER_WEIGHTS_NAME} lacks the {part} token rows of `{module}`.")
            if not torch.equal(self.adapter_tensors[key], self.token_rows(part)):
                raise BundleError(
                    f"the {part} token rows in {ADAPTER_WEIGHTS_NAME} differ from {WEIGHTS_NAME}: the bundle was "
                    "edited by hand or is corrupt. Re-export it."
                )

    def check(self, model: nn.Module, tokenizer_or_processor: Any) -> GateConfig:
        """Raise `BundleMismatchError` if the bundle does not fit `model`; return the GateConfig to attach with.

        Nothing is modified: the model, its tokenizer and its embeddings are only read.
        """
        from peft import PeftModel

        from safegate.modeling.model import SafeGateModel

        if isinstance(model, (SafeGateModel, PeftModel)):
            raise TypeError(f"`model` is a {type(model).__name__}; load a bundle onto the plain Hugging Face model.")
        cfg, b = self.gate_config, self.backbone
        arch = resolve(model, cfg.lora_target, cfg.lora_modules)
        live = {
            "gated_model_type": model_type_of(arch.root),
            "hidden_size": int(arch.embed.weight.shape[1]),
            "num_layers": len(arch.layers),
            "vocab_rows": int(arch.embed.weight.shape[0]),
            "tied": bool(arch.tied),
        }
        diffs = [(f, b[f], live[f]) for f in FINGERPRINT if b[f] != live[f]]
        if diffs:
            base = b["name_or_path"] or b["model_type"]
            hint = f"Load it onto the backbone it was trained for ({base}) or train a gate for this one."
            raise BundleMismatchError(*diffs[0], hint=hint, others=diffs[1:])
        self._check_tokenizer(text_tokenizer(tokenizer_or_processor), live["vocab_rows"])
        target = self._check_lora_modules(arch)
        return cfg if target in (None, arch.lora_target) else dataclasses.replace(cfg, lora_target=target)

    def _check_tokenizer(self, tokenizer: Any, rows: int) -> None:
        cfg = self.gate_config
        for field, token in (("safe_token", cfg.safe_token), ("unsafe_token", cfg.unsafe_token)):
            tid = token_id(tokenizer, token)
            if tid is None:
                continue
            try:
                _check_protected(tokenizer, {token: tid})
            except RuntimeError as err:
                raise BundleMismatchError(
                    field, token, f"an added token that text can spell (id {tid})", hint=str(err)
                ) from err
        safety = {cfg.safe_token, cfg.unsafe_token}
        top = max((i for t, i in tokenizer.get_vocab().items() if t not in safety), default=-1)
        if top >= rows:
            raise BundleMismatchError(
                "tokenizer_vocab", f"< {rows} (the model's embedding rows)", top + 1,
                hint="The tokenizer holds ids the model has no rows for: it does not belong to this model.",
            )  # fmt: skip

    def _check_lora_modules(self, arch: ResolvedArch) -> str | None:
        target = getattr(self.adapter_config, "target_modules", None)
        shapes: dict[str, dict[str, tuple[int, ...]]] = {}
        for key, tensor in self.adapter_tensors.items():
            if ".lora_" in key:
                module, _, rest = key.removeprefix(_PEFT_PREFIX).partition(".lora_")
                shapes.setdefault(module, {})[rest.split(".")[0]] = tuple(tensor.shape)
        if not shapes:
            return None
        modules = dict(arch.root.named_modules())
        missing = sorted(m for m in shapes if not isinstance(modules.get(m), nn.Linear))
        extra = sorted(n for n in modules if isinstance(target, str) and re.fullmatch(target, n) and n not in shapes)
        if missing or extra:
            model_value = f"absent: {missing[:3]}" if missing else f"also has {extra[:3]} ({len(extra)} in all)"
            raise BundleMismatchError(
                "lora_target_modules", f"{len(shapes)} modules matching {target!r}", model_value,
                hint="The model's decoder is not the one the LoRA adapter was trained on.",
            )  # fmt: skip
        for module, parts in sorted(shapes.items()):
            linear = modules[module]
            want = {
                "A": (self.gate_config.lora_r, linear.in_features),
                "B": (linear.out_features, self.gate_config.lora_r),
            }
            if any(parts.get(k) != v for k, v in want.items()):
                raise BundleMismatchError(f"lora shape of `{module}`", parts, want)
        return target if isinstance(target, str) else None

    def attach(self, model: nn.Module, tokenizer_or_processor: Any) -> SafeGateModel:
        """Check the fit (see `check`), then attach the gate with the bundle's weights and return the model."""
        from safegate.modeling.model import SafeGateModel

        config = self.check(model, tokenizer_or_processor)
        gated = SafeGateModel(model, tokenizer_or_processor, config)
        try:
            self._load_into(gated)
        except BaseException:
            gated.detach()
            raise
        return gated

    @torch.no_grad()
    def _load_into(self, gated: SafeGateModel) -> None:
        expected = get_peft_model_state_dict(gated.peft_model, adapter_name="default", save_embedding_layers=False)
        state = dict(self.adapter_tensors)
        for part, module in self._parts().items():
            state[_delta_key(state, module)] = self.token_rows(part)  # authoritative rows, keyed by token string
        if set(state) != set(expected):
            only_bundle, only_model = sorted(set(state) - set(expected)), sorted(set(expected) - set(state))
            raise BundleMismatchError("adapter keys", f"also {only_bundle[:3]}", f"also {only_model[:3]}")
        for key, tensor in state.items():
            if tensor.shape != expected[key].shape:
                raise BundleMismatchError(f"shape of `{key}`", tuple(tensor.shape), tuple(expected[key].shape))
        state = {k: v.to(expected[k].dtype) for k, v in state.items()}
        result = set_peft_model_state_dict(gated.peft_model, state, adapter_name="default")
        if result.unexpected_keys:
            raise BundleError(f"PEFT did not place adapter tensors {result.unexpected_keys[:3]}.")
        gate_state = {k.removeprefix("gate."): v for k, v in self.tensors.items() if k.startswith("gate.")}
        try:
            gated.gate.load_state_dict(gate_state, strict=True)
        except RuntimeError as err:
            raise BundleError(f"{WEIGHTS_NAME}: the gate weights do not fit the gate config: {err}") from err


# ------------------------------------------------------------------------------------------------ public API
def save_bundle(
    gated: SafeGateModel,
    path: str | os.PathLike,
    *,
    recipe: str | None = None,
    evaluation: Mapping | Sequence | None = None,
) -> Path:
    """Write `gated`'s bundle to the folder `path` atomically and return the folder.

    Args:
        gated (`SafeGateModel`): The gated model to export.
        path (`str | os.PathLike`): Target folder; an existing folder is replaced only if it is a bundle.
        recipe (`str | None`): Recipe name or path recorded in the config and the model card.
        evaluation (`Mapping | Sequence | None`): Evaluation table for the model card: a list of rows (dicts) or
            a mapping `name -> {column: value}` / `name -> value`.
    """
    SafeGateBundle.from_model(gated, recipe=recipe, evaluation=evaluation).save_pretrained(path)
    return Path(path)


def push_to_hub(
    gated: SafeGateModel,
    repo_id: str,
    *,
    recipe: str | None = None,
    evaluation: Mapping | Sequence | None = None,
    **kwargs: Any,
) -> str:
    """Upload `gated`'s bundle to the Hub repo `repo_id` in one commit; return the commit URL.

    `kwargs` go to `ModelHubMixin.push_to_hub`: `private`, `token`, `commit_message`, `branch`, `create_pr`,
    `allow_patterns`, `ignore_patterns`, `delete_patterns`.
    """
    kwargs.setdefault("commit_message", "Upload safegate bundle")
    return SafeGateBundle.from_model(gated, recipe=recipe, evaluation=evaluation).push_to_hub(repo_id, **kwargs)


def load_bundle(
    model: nn.Module,
    tokenizer_or_processor: Any,
    path_or_repo_id: str | os.PathLike,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
) -> SafeGateModel:
    """Load a bundle (folder or Hub repo id) onto `model` after checking that it fits; return the gated model.

    Raises:
        BundleMismatchError: the bundle was trained for another backbone (names field, bundle and model values).
        BundleError: missing, truncated or corrupt files, unknown schema version.
        BundleNotFoundError: no such folder, and no such Hub repo (or not cached when offline).
    """
    bundle = SafeGateBundle.from_pretrained(
        os.fspath(path_or_repo_id), revision=revision, token=token, cache_dir=cache_dir,
        local_files_only=bool(local_files_only),
    )  # fmt: skip
    return bundle.attach(model, tokenizer_or_processor)


def resolve_bundle(
    path_or_repo_id: str,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
) -> Path:
    """The local folder of a bundle: `path_or_repo_id` itself, or its Hub snapshot (`snapshot_download`)."""
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        if revision is not None:
            raise ValueError(f"`revision={revision!r}` applies to Hub repos, but {path} is a local folder.")
        return path
    if path.exists():
        raise BundleError(f"{path} is a file; a bundle is a folder (e.g. the one `save_bundle` wrote).")
    where = f"{path_or_repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    try:
        folder = snapshot_download(
            str(path_or_repo_id), revision=revision, token=token, cache_dir=cache_dir,
            local_files_only=local_files_only, force_download=force_download,
            allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, f"{ADAPTER_DIR}/*", CARD_NAME],
        )  # fmt: skip
    except HFValidationError as err:
        raise BundleNotFoundError(f"no bundle folder {where}, and it is not a valid Hub repo id: {err}") from err
    except (LocalEntryNotFoundError, HfHubHTTPError) as err:
        from huggingface_hub import constants

        offline = " (offline: HF_HUB_OFFLINE=1 or local_files_only=True)" if constants.HF_HUB_OFFLINE else ""
        raise BundleNotFoundError(
            f"no bundle folder {where}, and the Hub repo could not be resolved{offline}: {err}"
        ) from err
    return Path(folder)


# --------------------------------------------------------------------------------------------- helpers
def _token_layers(gated: SafeGateModel) -> dict[str, nn.Module]:
    """PEFT trainable-token layers holding rows: `embed` and, for untied heads, `head` (LoRA or tokens-only)."""
    found = {}
    names = {gated._embed_name: "embed", gated._head_name: "head"}
    for name, module in gated.peft_model.named_modules():
        if type(module).__name__ != "TrainableTokensLayer" or "default" not in module.trainable_tokens_delta:
            continue
        if getattr(module, "tied_adapter", None) is not None:
            continue
        path = name.removeprefix(_PEFT_PREFIX).removesuffix(".token_adapter")
        if path in names:
            found[names[path]] = module
    return found


def _delta_key(tensors: Mapping[str, torch.Tensor], module: str) -> str | None:
    for key in (f"{_PEFT_PREFIX}{module}.token_adapter.{_DELTA}", f"{_PEFT_PREFIX}{module}.{_DELTA}"):
        if key in tensors:
            return key
    return None


def _cpu(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu", copy=True).contiguous()
