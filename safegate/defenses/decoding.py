"""Shared machinery of the decode-time defenses: see every decoding step `generate` runs, and run side passes.

A defense plugs one `LogitsProcessor` into the model's own `generate`. To act, the processor must know the
exact inputs of the forward pass that produced the scores it receives (ids, positions, mask, cache), so that a
side pass (SafeCoDe's noised branch, SafeSteer's candidate tokens) sees the same thing. `StepRecorder` keeps the
keyword arguments of the latest forward of the generating module through a forward pre-hook; the side passes
pause it. `next_step_kwargs` builds the inputs of the *next* step from them, the way `generate` itself advances
the mask and the position ids.

Example:
    >>> import torch
    >>> from safegate.testing import tiny_model_and_tokenizer
    >>> model, tok = tiny_model_and_tokenizer("qwen2")
    >>> with StepRecorder(model) as rec:
    ...     _ = model.generate(**tok(["hi"], return_tensors="pt"), max_new_tokens=3, min_new_tokens=3)
    ...     print(rec.calls, tuple(rec.last["input_ids"].shape))
    3 (1, 1)
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from safegate.modeling.kv_cache import CACHE_KWARG, CACHE_KWARGS, without_cache
from safegate.modeling.prefix import repeat_rows

try:  # the list `generate` itself uses; fall back to the 5.23 contents if it moves
    from transformers.generation.utils import MULTIMODAL_INPUTS_TO_DROP_OUTSIDE_PREFILL as _PREFILL_ONLY
except ImportError:  # pragma: no cover - depends on the transformers version
    _PREFILL_ONLY = ("pixel_values", "pixel_values_videos", "input_features", "image_sizes", "pixel_attention_mask")

PREFILL_ONLY_INPUTS: tuple[str, ...] = tuple(_PREFILL_ONLY) + ("feature_attention_mask",)

_UNSUPPORTED = {
    "num_beams": "beam search is not supported by decode-time defenses; use greedy decoding or sampling",
    "assistant_model": "assisted decoding is not supported by decode-time defenses",
    "prompt_lookup_num_tokens": "prompt-lookup decoding is not supported by decode-time defenses",
    "prefill_chunk_size": "chunked prefill is not supported: the side passes need the whole prompt in one forward",
    **dict.fromkeys(CACHE_KWARGS, "a user-supplied cache is not supported: each defense builds its own caches"),
    "inputs_embeds": "pass `input_ids`: the defenses read the prompt ids (judge text, image rows, prompt length)",
}


class DropInSurface:
    """What `generate` callers and pipelines read from a model, forwarded to the wrapped `root` / `arch`."""

    root: Any
    arch: Any

    @property
    def config(self) -> Any:
        return self.root.config

    @property
    def generation_config(self) -> Any:
        return self.root.generation_config

    @property
    def device(self) -> torch.device:
        return self.arch.embed.weight.device

    def can_generate(self) -> bool:
        return True


class StepRecorder:
    """Forward pre-hook that keeps the keyword arguments of the latest call of `module` in this thread.

    Args:
        module (`nn.Module`): the module whose `generate` runs (e.g. the Omni thinker).

    Attributes:
        last (`dict | None`): kwargs of the latest recorded forward (the real branch).
        calls (`int`): number of recorded forwards (the prefill is call 1).
        forwards_done (`int`): recorded forwards that have finished (0 while the prompt pass runs).
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.last: dict[str, Any] | None = None
        self.calls = 0
        self.forwards_done = 0
        self._paused = 0
        self._thread = threading.get_ident()
        self._handles: list[Any] = []

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if self._paused or threading.get_ident() != self._thread:
            return
        if args:
            raise RuntimeError(
                f"{type(module).__name__} was called with positional arguments during `generate`; decode-time "
                "defenses need keyword inputs (transformers >= 5 calls the model with keywords only)."
            )
        self.last = dict(kwargs)
        self.calls += 1

    def _done(self, module: nn.Module, args: tuple, output: Any) -> None:
        if not self._paused and threading.get_ident() == self._thread:
            self.forwards_done += 1

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Run side passes without recording them."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def __enter__(self) -> StepRecorder:
        self._thread = threading.get_ident()
        self.last, self.calls, self.forwards_done = None, 0, 0
        self._handles = [
            self.module.register_forward_pre_hook(self._hook, with_kwargs=True),
            self.module.register_forward_hook(self._done),
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.last = None  # drop the reference to the real cache


def expanded_cache(cache: Any, repeats: int) -> Any:
    """A copy of a dynamic KV cache with each row repeated `repeats` times; the original is never written to.

    Layers are shallow-copied: dynamic layers replace (`torch.cat`) rather than modify their tensors on update,
    so feeding tokens to the copy leaves the original as it was.
    """
    layers = getattr(cache, "layers", None)
    if layers is None:
        side = copy.deepcopy(cache)
        if repeats > 1:
            side.batch_repeat_interleave(repeats)
        return side
    side = copy.copy(cache)
    side.layers = [copy.copy(layer) for layer in layers]
    if repeats > 1:
        for layer in side.layers:
            layer.batch_repeat_interleave(repeats)
    return side


def next_step_kwargs(last: dict[str, Any], tokens: torch.Tensor, cache: Any, repeats: int = 1) -> dict[str, Any]:
    """Inputs of the step after `last` that feeds `tokens` (`(B*repeats, 1)`), on `cache`.

    Mirrors `GenerationMixin._update_model_kwargs_for_generation`: the 2-D mask grows by one column, position ids
    (2-D or M-RoPE 3-D) advance by one, `mm_token_type_ids` get a text (0) entry, and prefill-only multimodal
    inputs are dropped. Each prompt row is repeated `repeats` times (candidate batches).
    """
    kwargs = {k: v for k, v in without_cache(last).items() if k not in PREFILL_ONLY_INPUTS}
    kwargs["input_ids"] = tokens
    kwargs[CACHE_KWARG] = cache
    mask = last.get("attention_mask")
    if isinstance(mask, torch.Tensor):
        if mask.dim() != 2:
            raise NotImplementedError(
                "a 4-D attention mask reached the model (static or compiled cache); decode-time defenses need the "
                "default dynamic cache: drop `cache_implementation`."
            )
        kwargs["attention_mask"] = repeat_rows(torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1), repeats)
    positions = last.get("position_ids")
    if isinstance(positions, torch.Tensor):
        kwargs["position_ids"] = repeat_rows(positions[..., -1:] + 1, repeats, dim=positions.dim() - 2)
    for key in ("mm_token_type_ids", "token_type_ids"):
        value = last.get(key)
        if isinstance(value, torch.Tensor):
            step = value.new_zeros(value.shape[0], 1) if key == "mm_token_type_ids" else value[:, -1:]
            kwargs[key] = repeat_rows(step, repeats)
    return kwargs


def check_generate_kwargs(kwargs: dict[str, Any], generation_config: Any) -> None:
    """Refuse generation modes the defenses cannot follow step by step (error names the option and the fix)."""
    for key, why in _UNSUPPORTED.items():
        value = kwargs.get(key, getattr(generation_config, key, None))
        if value is not None and not (key == "num_beams" and value == 1):
            raise ValueError(f"`{key}={value!r}`: {why}.")
    cache = kwargs.get("cache_implementation", getattr(generation_config, "cache_implementation", None))
    if cache not in (None, "dynamic"):
        raise ValueError(
            f"`cache_implementation={cache!r}`: decode-time defenses copy and extend the dynamic cache step by step; "
            "remove the option (the default dynamic cache is used)."
        )


def expected_rows(input_ids: torch.Tensor, kwargs: dict[str, Any], generation_config: Any) -> int:
    """How many rows `generate` decodes: prompts x `num_return_sequences`."""
    n = kwargs.get("num_return_sequences", getattr(generation_config, "num_return_sequences", None)) or 1
    return int(input_ids.shape[0] * n)


def media_token_ids(config: Any) -> list[int]:
    """Ids of image/video placeholder tokens of a multimodal config (empty for text models)."""
    ids = []
    for name in ("image_token_id", "video_token_id"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            ids.append(value)
    return ids


def rows_with_images(input_ids: torch.Tensor, config: Any, has_pixels: bool) -> torch.Tensor:
    """Bool (B,): which prompt rows hold an image or video placeholder.

    OUR CHOICE: when pixels were passed but the config names no placeholder id, every row counts as having one.
    """
    if not has_pixels:
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    ids = media_token_ids(config)
    if not ids:
        return torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    return torch.isin(input_ids, torch.tensor(ids, device=input_ids.device)).any(dim=-1)


def eos_ids(generation_config: Any, tokenizer: Any) -> list[int]:
    """End-of-sequence ids from the generation config, else the tokenizer."""
    eos = getattr(generation_config, "eos_token_id", None)
    if eos is None:
        eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        return []
    if isinstance(eos, torch.Tensor):
        eos = eos.tolist()
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def force_tokens(scores: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """New scores where each row in `rows` (bool (B,)) allows only its id in `tokens` ((B,)); others unchanged."""
    forced = torch.full_like(scores, float("-inf")).scatter_(1, tokens.view(-1, 1).to(scores.device), 0.0)
    return torch.where(rows.view(-1, 1).to(scores.device), forced, scores)


def attach_metadata(out: Any, **fields: Any) -> Any:
    """Set extra attributes on a `generate` output (a `ModelOutput` keeps unknown attributes as plain fields)."""
    for key, value in fields.items():
        setattr(out, key, value)
    return out
