"""Gate bundles: the small safetensors export of a trained gate, loaded strictly onto a matching backbone.

A bundle is a folder or a Hugging Face Hub repo holding `safegate_config.json`, `safegate.safetensors`, a PEFT
`adapter/` and a model card; saving is atomic, loading is strict and reads only JSON and safetensors (format and
rules: `docs/bundle-format.md`). Importing this module registers `SafeGateBundle` as `SafeGateModel.bundle_class`,
which `gated.save_bundle` / `gated.push_to_hub` write through.

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
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import ModelCard, ModelHubMixin
from peft import PeftConfig, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import save_file
from torch import nn

from safegate.hub.atomic import write_folder
from safegate.hub.card import evaluation_rows, model_card
from safegate.hub.checks import backbone_identity, check_fits, check_tensors, delta_key
from safegate.hub.files import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_DIR,
    ADAPTER_WEIGHTS_NAME,
    BUNDLE_FILES,
    CHECKSUMMED,
    CONFIG_NAME,
    FORMAT,
    PAPER_URL,
    REQUIRED_FILES,
    SCHEMA_VERSION,
    WEIGHTS_NAME,
    BundleError,
    BundleMismatchError,
    BundleNotFoundError,
    bundle_sizes,
    check_file,
    check_target,
    file_record,
    read_json,
    read_safetensors,
    resolve_bundle,
    versions,
)
from safegate.hub.schema import check_adapter_config, check_config
from safegate.modeling.arch import resolve
from safegate.modeling.config import GateConfig
from safegate.modeling.lifecycle import AttachRollback
from safegate.modeling.model import SafeGateModel
from safegate.modeling.tokens import text_tokenizer

__all__ = [
    "BUNDLE_FILES", "CONFIG_NAME", "SCHEMA_VERSION", "WEIGHTS_NAME", "BundleError", "BundleMismatchError",
    "BundleNotFoundError", "SafeGateBundle", "bundle_sizes", "load_bundle", "push_to_hub", "resolve_bundle",
    "save_bundle",
]  # fmt: skip


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
        check_tensors(self)

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

    @property
    def token_modules(self) -> dict[str, str]:
        """Token-row part (`"embed"`, and `"head"` for untied heads) -> module path inside the gated module."""
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
        for part, layer in gated.token_layers().items():
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
        config = {
            "format": FORMAT,
            "schema_version": SCHEMA_VERSION,
            "versions": versions(),
            "method": {"name": "CASA", "paper": PAPER_URL},
            "backbone": {
                **backbone_identity(gated),
                "vocab_rows": int(gated.original_vocab_rows),
                "vocab_rows_gated": int(rows),
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
        updated if it is a bundle, and only the bundle's own files are replaced: a report or a `checkpoints/`
        folder beside them stays (`safegate.hub.atomic`).
        """
        if config is not None:
            raise ValueError("`config` is not supported: a bundle never writes a root config.json (see CONFIG_NAME).")
        target = Path(os.path.abspath(save_directory))  # "." or "gate/" get a real name for the temp folder
        check_target(target)

        def write(folder: Path) -> None:
            ModelHubMixin.save_pretrained(self, folder, model_card_kwargs=model_card_kwargs)
            if (folder / "config.json").exists():
                raise RuntimeError("a root config.json was written; bundles must not have one")

        write_folder(target, write, own=BUNDLE_FILES)
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
        return model_card(self._hub_mixin_info.model_card_data, self.config, self.payload_bytes)

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
        config = check_config(read_json(folder / CONFIG_NAME), with_files=True)  # every field, `hub.schema`
        for name in CHECKSUMMED:
            check_file(folder, name, config["files"][name])
        adapter_config = read_json(folder / ADAPTER_CONFIG_NAME)
        check_adapter_config(adapter_config, GateConfig.from_dict(config["gate_config"]))
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
    def check(self, model: nn.Module, tokenizer_or_processor: Any) -> GateConfig:
        """Raise `BundleMismatchError` if the bundle does not fit `model`; return the GateConfig to attach with.

        Nothing is modified: the model, its tokenizer and its embeddings are only read (`safegate.hub.checks`).
        """
        return check_fits(self, model, tokenizer_or_processor)

    def attach(self, model: nn.Module, tokenizer_or_processor: Any) -> SafeGateModel:
        """Check the fit (see `check`), then attach the gate with the bundle's weights and return the model."""
        config = self.check(model, tokenizer_or_processor)
        root = resolve(model, config.lora_target, config.lora_modules).root
        tokens = (config.safe_token, config.unsafe_token)
        rollback = AttachRollback(model, root, text_tokenizer(tokenizer_or_processor), tokens)
        gated = SafeGateModel(model, tokenizer_or_processor, config)
        try:
            self._load_into(gated)
        except BaseException:  # after every check passed (it should not happen): model and tokenizer as they were
            gated.detach()
            rollback.restore(None)
            raise
        return gated

    @torch.no_grad()
    def _load_into(self, gated: SafeGateModel) -> None:
        expected = get_peft_model_state_dict(gated.peft_model, adapter_name="default", save_embedding_layers=False)
        state = dict(self.adapter_tensors)
        for part, module in self.token_modules.items():
            state[delta_key(state, module)] = self.token_rows(part)  # authoritative rows, keyed by token string
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
    return gated.save_bundle(path, recipe=recipe, evaluation=evaluation)


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
    return gated.push_to_hub(repo_id, recipe=recipe, evaluation=evaluation, **kwargs)


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


# --------------------------------------------------------------------------------------------- helpers
def _cpu(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu", copy=True).contiguous()


SafeGateModel.bundle_class = SafeGateBundle  # `gated.save_bundle` / `gated.push_to_hub` write this format
