"""Merged export: a gated model as a plain Hugging Face checkpoint any engine loads, plus the gate beside it.

`gated.save_merged(DIR)` (or `safegate export --merged DIR`) writes, atomically: the model with LoRA merged into its
weights and the two safety tokens' trained rows in the input embedding and the head (`config.json`,
`model*.safetensors`), the tokenizer or processor holding the two tokens at the gated model's ids, the gate's
weights (`safegate_gate.safetensors`), its manifest (`safegate_merged.json`) and a model card. The caller's gated
model is not modified (the merge is computed beside its weights). Engines whose LoRA support refuses adapters that
add vocabulary (vLLM) serve this checkpoint as a plain model.

The way back: `load_merged(DIR, **from_pretrained_kwargs)` loads it with transformers and attaches the gate without
adding tokens or LoRA (`GateConfig(lora_r=0)`: only the two token rows become a PEFT layer, holding the merged rows),
so its verdicts, scores and answers are the bundle path's. Serving code that must not build a transformers model
reads only the gate with `read_merged_gate(DIR)` and decides with `merged_verdict` (exact computation: its
docstring; format: `docs/serving.md`, "Merged export").

Example:
    >>> import tempfile, safegate
    >>> from safegate.testing import chat, tiny_model_and_tokenizer
    >>> model, tok = tiny_model_and_tokenizer("qwen2")
    >>> gated = safegate.attach(model, tok, safegate.GateConfig(attention_dim=16, lora_r=4))
    >>> tmp = tempfile.TemporaryDirectory()
    >>> folder = gated.save_merged(f"{tmp.name}/merged")
    >>> reloaded, reloaded_tok = safegate.load_merged(folder)
    >>> inputs = chat(tok, ["How do I bake bread?"])
    >>> bool(torch.allclose(reloaded.classify(**inputs), gated.classify(**inputs), atol=1e-5))
    True
    >>> gate = read_merged_gate(folder)
    >>> (gate.safe_token, gate.safe_id) == ("<|safe|>", reloaded_tok.convert_tokens_to_ids("<|safe|>"))
    True
    >>> tmp.cleanup()
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from safegate.hub.atomic import write_folder
from safegate.hub.checks import backbone_identity, check_tokenizer
from safegate.hub.files import (
    PAPER_URL,
    BundleError,
    BundleMismatchError,
    BundleNotFoundError,
    read_json,
    read_safetensors,
    versions,
)
from safegate.hub.merged_files import (
    CARD_NAME,
    GATE_WEIGHTS_NAME,
    INDEX_NAME,
    MANIFEST_NAME,
    MERGED_FORMAT,
    MERGED_SCHEMA_VERSION,
    check_files,
    check_gate_state,
    check_manifest,
    check_merged_target,
    hidden_states_index,
    merged_card,
    merged_state_dict,
    sha256,
    tapped_layer,
    write_weights_index,
)
from safegate.modeling.arch import resolve
from safegate.modeling.config import GateConfig, check_threshold
from safegate.modeling.gate import SafetyGate, gate_pair_logits, unsafe_probability
from safegate.modeling.gate_ensemble import GateEnsemble, build_gate, query_name
from safegate.modeling.model import SafeGateModel
from safegate.modeling.tokens import text_tokenizer, token_id
from safegate.modeling.verdict import SAFE, UNSAFE

__all__ = ["MergedGate", "load_merged", "merged_verdict", "read_merged_gate", "save_merged"]


@dataclass(frozen=True)
class MergedGate:
    """Everything the verdict needs, read from a merged export without building a model (`read_merged_gate`).

    Args:
        config (`GateConfig`): The gate's config (`lora_r=0`: LoRA is in the weights).
        state (`dict[str, torch.Tensor]`): The gate's state (`SafetyGate`; `members.<k>.` per member of a
            `GateEnsemble`): projections, norm, read-out, `query`, and the
            input standardisation buffers `input_mean` / `input_inv_std`.
        safe_id (`int`), unsafe_id (`int`): Vocabulary ids of the two safety tokens in the exported tokenizer.
        safe_token (`str`), unsafe_token (`str`): Their strings (e.g. `<|safe|>`, `<|unsafe|>`).
        tapped_layer (`int`): `-1`: the gate reads the final norm's output (the states the head projects); `k >= 0`:
            the output of decoder layer `k` (0-based; the full residual stream after that layer).
        num_layers (`int`), hidden_size (`int`): The backbone's decoder depth and state width.
        threshold (`float | None`): Default p(unsafe) threshold; `None` = argmax of the gated pair.
    """

    config: GateConfig
    state: dict[str, torch.Tensor]
    safe_id: int
    unsafe_id: int
    safe_token: str
    unsafe_token: str
    tapped_layer: int
    num_layers: int
    hidden_size: int
    threshold: float | None

    @property
    def hidden_states_index(self) -> int | None:
        """Index of the tapped states in transformers' `output_hidden_states` tuple (`None`: not in it)."""
        return hidden_states_index(self.tapped_layer, self.num_layers)

    @functools.cached_property
    def module(self) -> SafetyGate | GateEnsemble:
        """The gate (float32, eval mode), built once; `merged_verdict` moves it to the states."""
        query = self.state[query_name(self.config)]
        gate = build_gate(self.hidden_size, query, self.config)
        gate.load_state_dict(self.state, strict=True)
        return gate.eval().requires_grad_(False)


@torch.no_grad()
def merged_verdict(
    gate: MergedGate, tapped_states: torch.Tensor, safety_logits: torch.Tensor, threshold: float | None = None
) -> tuple[str, float]:
    """`(verdict, p_unsafe)` for one prompt, exactly as `SafeGateModel.generate` / `classify` decide it.

    Inputs, for one prompt as the model sees it (chat template applied, with the assistant header that
    `add_generation_prompt=True` adds; no padding, no assistant prefix):

    - `tapped_states` (`(seq, hidden)`): the states of the tapped layer at every prompt position, first to last
      (`gate.tapped_layer`: `-1` = the final norm's output, i.e. what the head projects; `k` = decoder layer `k`'s
      output; with transformers, `output_hidden_states[gate.hidden_states_index]`). All positions count (the gate's
      mask is all ones).
    - `safety_logits` (`(2,)`): the model's raw logits of `(safe_id, unsafe_id)` at the last prompt position, as
      the model returns them (after any soft-capping the model itself applies; before temperature, penalties or any
      logits processor); for most models the head's two safety rows times the final norm's output there.

    Computation (`modeling/model.py` `gate_logit`, `gated_pair`, `decide_pair`; `modeling/gate.py`):

    1. `x = SafetyGate(tapped_states, mask=1)`: the states are standardised per feature, `h' = (h - input_mean) *
       input_inv_std` (the query too), pooled by one attention head (`a = softmax_t(0.05 · q̃·K_t / sqrt(d_a))`,
       `K = h' W_K`, `q̃ = q' W_Q`), read out as `x = w_o · LayerNorm(W_V Σ_t a_t h'_t) + b_o` (for the
       `mean_sigmoid` / `max_sigmoid` aggregations see `SafetyGate.forward`); `v_s = sigmoid(x)`. With
       `GateConfig.members = K > 1` (`modeling.gate_ensemble`) `x` is the mean of K such gates' logits.
    2. Gated pair, `scaling="log_additive"` (default): `z_s' = z_s + log(1 - v_s)`, `z_u' = z_u + log v_s`
       (`"multiplicative"`: `z_s' = (1 - v_s) z_s`, `z_u' = v_s z_u`), in float32.
    3. `p_unsafe = sigmoid(z_u' - z_s')`; the verdict is `"unsafe"` iff `p_unsafe >= threshold` when a threshold is
       given (argument, else `gate.threshold`), else iff `z_u' >= z_s'` (ties fail closed); a NaN is unsafe.

    The decided token (`safe_id` or `unsafe_id`) is then appended to the prompt and decoding continues from it; it
    is not part of the answer.

    Example:
        >>> import torch
        >>> from safegate.modeling.config import GateConfig
        >>> gate_module = SafetyGate(8, torch.zeros(8), attention_dim=4)
        >>> gate = MergedGate(GateConfig(attention_dim=4, lora_r=0), gate_module.state_dict(), 10, 11, "<|safe|>",
        ...                   "<|unsafe|>", -1, 2, 8, None)
        >>> merged_verdict(gate, torch.randn(5, 8), torch.tensor([1.0, 0.0]))  # v_s = 0.5: the raw pair decides
        ('safe', 0.2689414322376251)
    """
    if tapped_states.dim() != 2 or tapped_states.shape[-1] != gate.hidden_size or tapped_states.shape[0] < 1:
        raise ValueError(
            f"`tapped_states` must be (seq, {gate.hidden_size}) for one prompt, got {tuple(tapped_states.shape)}."
        )
    if safety_logits.numel() != 2:
        raise ValueError(f"`safety_logits` must hold the 2 logits of (safe_id, unsafe_id), got {safety_logits.shape}.")
    z_safe, z_unsafe = gated_safety_pair(gate, tapped_states, safety_logits)
    return decide_pair(z_safe, z_unsafe, threshold if threshold is not None else gate.threshold)


def gated_safety_pair(
    gate: MergedGate, tapped_states: torch.Tensor, safety_logits: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 1 and 2 of `merged_verdict`: the gated pair `(z_s', z_u')` (float32 scalars) of one prompt."""
    module = gate.module.to(tapped_states.device)
    mask = torch.ones(1, tapped_states.shape[0], device=tapped_states.device)
    x = module(tapped_states.unsqueeze(0), mask)
    pair = safety_logits.reshape(2).float().to(x.device)
    z_safe, z_unsafe = gate_pair_logits(pair[:1], pair[1:], x, gate.config.scaling)
    return z_safe.reshape(()), z_unsafe.reshape(())


def decide_pair(z_safe: torch.Tensor, z_unsafe: torch.Tensor, threshold: float | None) -> tuple[str, float]:
    """Step 3 of `merged_verdict`: `(verdict, p_unsafe)` from a gated pair; `threshold=None` decides by argmax (ties
    and NaN fail closed).

    Example:
        >>> import torch
        >>> zero = torch.tensor(0.0)
        >>> decide_pair(zero, zero, None), decide_pair(zero, torch.tensor(-1.0), 0.2)
        (('unsafe', 0.5), ('unsafe', 0.2689414322376251))
    """
    threshold = check_threshold(threshold, "threshold")
    p = unsafe_probability(z_safe, z_unsafe)
    unsafe = bool(p >= threshold) if threshold is not None else bool(z_unsafe >= z_safe)
    return (UNSAFE if unsafe or bool(p.isnan()) else SAFE), float(p)


def read_merged_gate(path: str | os.PathLike) -> MergedGate:
    """Read and validate the gate of the merged export at folder `path`; loads no model and no tokenizer.

    Checks the manifest's schema, that every file it lists is present with its size (the gate file also with its
    sha256), and that the gate's tensors are finite and exactly those its config builds. `BundleError` names the
    file and the fix.
    """
    folder = Path(path)
    if not (folder / MANIFEST_NAME).is_file():
        raise BundleNotFoundError(
            f"{folder} is not a safegate merged export (no {MANIFEST_NAME}); write one with `gated.save_merged(DIR)`."
        )
    manifest = check_manifest(read_json(folder / MANIFEST_NAME))
    check_files(folder, manifest["files"])
    backbone, tokens = manifest["backbone"], manifest["tokens"]
    config = GateConfig.from_dict(manifest["gate_config"])
    state = check_gate_state(read_safetensors(folder / GATE_WEIGHTS_NAME), config, backbone["hidden_size"])
    return MergedGate(
        config=config, state=state, safe_id=tokens["safe_id"], unsafe_id=tokens["unsafe_id"],
        safe_token=config.safe_token, unsafe_token=config.unsafe_token, tapped_layer=manifest["gate"]["tapped_layer"],
        num_layers=backbone["num_layers"], hidden_size=backbone["hidden_size"], threshold=config.threshold,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------- saving
def save_merged(gated: SafeGateModel, path: str | os.PathLike) -> Path:
    """Write `gated` as a merged export to the folder `path` atomically and return the folder (`gated.save_merged`).

    A non-empty folder is replaced only if it is a merged export; then only that export's files are replaced and
    anything else in it (a report) stays. `gated` is not modified.
    """
    gated._check_attached()
    if gated.gate_config.safe_answer != "adapted":
        raise ValueError(
            f"save_merged: this gate has GateConfig.safe_answer={gated.gate_config.safe_answer!r}: safe answers "
            "come from the base model with LoRA off, which one merged set of weights cannot hold. Export it as a "
            "bundle (`save_bundle`), or set `gated.gate_config.safe_answer = 'adapted'` first to serve the adapted "
            "answers."
        )
    target = Path(os.path.abspath(path))
    check_merged_target(target)
    previous = _previous_files(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # named like write_folder's temporaries, so a later save removes it if this process is killed mid-save
    stage = target.parent / f".{target.name}.stage-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    stage.mkdir()
    try:
        _write_export(gated, stage)
        written = sorted(p.relative_to(stage).as_posix() for p in stage.rglob("*") if p.is_file())

        def move(folder: Path) -> None:
            for name in written:
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
                os.replace(stage / name, folder / name)

        write_folder(target, move, own=set(written) | previous)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return target


def _previous_files(target: Path) -> set[str]:
    """Files of the merged export already at `target` (replaced or removed by the new one)."""
    try:
        files = json.loads((target / MANIFEST_NAME).read_text(encoding="utf-8")).get("files", {})
    except (OSError, ValueError, AttributeError):
        return set()
    names = {name for name in files if isinstance(name, str) and not Path(name).is_absolute()}
    return {name for name in names if ".." not in Path(name).parts} | {MANIFEST_NAME}


def _write_export(gated: SafeGateModel, folder: Path) -> None:
    """Write every file of the export into the empty `folder`."""
    arch, cfg = gated.arch, gated.gate_config
    gated.original_model.save_pretrained(folder, state_dict=merged_state_dict(gated))
    if not (folder / INDEX_NAME).is_file():  # unsharded: an index keeps engines (vLLM) off the gate's weights file
        write_weights_index(folder)
    gated.processor.save_pretrained(folder)
    gate_state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in gated.gate.state_dict().items()}
    save_file(gate_state, str(folder / GATE_WEIGHTS_NAME), metadata={"format": "pt"})
    layers = len(arch.layers)
    manifest: dict[str, Any] = {
        "format": MERGED_FORMAT,
        "schema_version": MERGED_SCHEMA_VERSION,
        "versions": versions(),
        "method": {"name": "CASA", "paper": PAPER_URL},
        "backbone": {
            **backbone_identity(gated),
            "vocab_rows": int(arch.embed.weight.shape[0]),
            "original_vocab_rows": int(gated.original_vocab_rows),
        },
        "tokens": {
            "safe": cfg.safe_token,
            "unsafe": cfg.unsafe_token,
            "safe_id": gated.safe_token_id,
            "unsafe_id": gated.unsafe_token_id,
        },  # fmt: skip
        "gate": {
            "tapped_layer": tapped_layer(cfg, layers),
            "tapped_module": arch.module_name(gated.tap_module),
            "hidden_states_index": hidden_states_index(tapped_layer(cfg, layers), layers),
        },
        "gate_config": dataclasses.replace(cfg, lora_r=0).to_dict() | {"lora_modules": list(cfg.lora_modules)},
        "merged_lora": {"r": cfg.lora_r, "alpha": cfg.lora_alpha, "target": arch.lora_target},
        "threshold": cfg.threshold,
    }
    merged_card(manifest).save(folder / CARD_NAME)
    files = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size} for p in folder.rglob("*") if p.is_file()}
    files[GATE_WEIGHTS_NAME]["sha256"] = sha256(folder / GATE_WEIGHTS_NAME)
    manifest["files"] = dict(sorted(files.items()))
    check_manifest(manifest)
    text = json.dumps(manifest, indent=2, ensure_ascii=False)
    (folder / MANIFEST_NAME).write_text(text + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------------------------ loading
def load_merged(path: str | os.PathLike, **from_pretrained_kwargs: Any) -> tuple[SafeGateModel, Any]:
    """Load the merged export at folder `path`; return `(gated model, tokenizer_or_processor)`.

    The model and its tokenizer or processor load with transformers (`safegate.load_model`: `dtype`, `device_map`,
    ... go to `from_pretrained`); the gate is attached with `GateConfig(lora_r=0)`, which adds no LoRA and no
    tokens (the tokenizer holds them at the recorded ids): the two token rows become a PEFT layer initialised from
    the merged rows, so the model computes exactly what the checkpoint holds. Then the gate's weights are loaded.

    Raises:
        BundleNotFoundError: `path` is not a merged export.
        BundleError: a file is missing, truncated or corrupt, or the manifest or gate tensors are invalid.
        BundleMismatchError: the checkpoint or tokenizer does not match the manifest (names the field).
    """
    from safegate.backbones.load import DTYPES, load_model

    gate = read_merged_gate(path)
    kwargs = dict(from_pretrained_kwargs)
    if isinstance(kwargs.get("dtype"), torch.dtype):  # `load_model` takes the dtype's name
        names = {v: k for k, v in DTYPES.items() if isinstance(v, torch.dtype)}
        kwargs["dtype"] = names.get(kwargs["dtype"], kwargs["dtype"])
    model, processor = load_model(os.fspath(path), **kwargs)
    _check_model(gate, model, processor)
    with warnings.catch_warnings():  # PEFT cannot tie a tied head's token rows; here both already hold the merged rows
        warnings.filterwarnings("ignore", message=".*no implementation exists to tie the adapters.*")
        gated = SafeGateModel(model, processor, gate.config)
    try:
        found = (gated.safe_token_id, gated.unsafe_token_id)
        if found != (gate.safe_id, gate.unsafe_id):
            raise BundleMismatchError("safety token ids", (gate.safe_id, gate.unsafe_id), found)
        _load_rows_and_gate(gated, gate)
    except BaseException:
        gated.detach()
        raise
    return gated, processor


def _check_model(gate: MergedGate, model: Any, processor: Any) -> None:
    """Raise `BundleMismatchError` unless the loaded checkpoint and tokenizer are the ones the manifest describes."""
    cfg = gate.config
    arch = resolve(model, cfg.lora_target, cfg.lora_modules)
    rows = int(arch.embed.weight.shape[0])
    live = {"hidden_size": int(arch.embed.weight.shape[1]), "num_layers": len(arch.layers)}
    for field, value in live.items():
        if value != getattr(gate, field):
            raise BundleMismatchError(field, getattr(gate, field), value, hint=f"({MANIFEST_NAME} vs config.json)")
    tok = text_tokenizer(processor)
    for token, tid in ((gate.safe_token, gate.safe_id), (gate.unsafe_token, gate.unsafe_id)):
        found = token_id(tok, token)
        if found != tid:
            raise BundleMismatchError(
                f"id of {token!r}", tid, found,
                hint=f"The tokenizer saved with the export must hold the safety tokens at the ids {MANIFEST_NAME} "
                "records; re-export with `gated.save_merged(DIR)`.",
            )  # fmt: skip
        if tid >= rows:
            raise BundleMismatchError(f"embedding row of {token!r}", tid, f"only {rows} rows")
    check_tokenizer(cfg, tok, rows)


@torch.no_grad()
def _load_rows_and_gate(gated: SafeGateModel, gate: MergedGate) -> None:
    for layer in gated.token_layers().values():  # the merged rows, not attach's initial ones
        delta = layer.trainable_tokens_delta["default"]
        delta.copy_(layer.base_layer.weight[list(layer.token_indices["default"])].to(delta.dtype))
    try:
        gated.gate.load_state_dict(gate.state, strict=True)
    except RuntimeError as err:
        raise BundleError(f"{GATE_WEIGHTS_NAME}: the gate weights do not fit the gate config: {err}") from err


SafeGateModel.merged_writer = save_merged  # `gated.save_merged` writes this format
