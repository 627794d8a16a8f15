"""`SafeGateModel` and `attach()`: a CASA safety gate on any Hugging Face causal or multimodal model.

Example:
    >>> import safegate
    >>> from safegate.testing import tiny_model_and_tokenizer
    >>> model, tok = tiny_model_and_tokenizer("qwen2")
    >>> gated = safegate.attach(model, tok, safegate.GateConfig(attention_dim=16, lora_r=4))
    >>> inputs = tok(["How do I bake bread?"], return_tensors="pt")
    >>> out = gated.generate(**inputs, max_new_tokens=4, return_dict_in_generate=True)
    >>> out.safety[0] in ("safe", "unsafe"), out.sequences.shape[1] <= inputs["input_ids"].shape[1] + 4
    (True, True)
    >>> base = gated.detach()
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from peft import LoraConfig, PeftModel, TrainableTokensConfig, get_peft_model
from torch import nn
from transformers import GenerationConfig, LogitsProcessorList

from safegate.modeling.arch import MULTIMODAL_INPUTS, check_required_inputs, resolve
from safegate.modeling.config import GateConfig, check_threshold
from safegate.modeling.gate import SafetyGate, gate_pair_logits, unsafe_probability
from safegate.modeling.hooks import ContiguousHeadInput, HiddenStateTap
from safegate.modeling.kv_cache import CACHE_KWARGS
from safegate.modeling.logits_process import SafeGateLogitsProcessor
from safegate.modeling.peft_tokens import speed_up_trainable_tokens
from safegate.modeling.prefix import (
    assistant_header,
    inserted_token_value,
    left_pad,
    prefix_lengths,
    repeat_rows,
    special_ids,
)
from safegate.modeling.speculative import generate_speculatively, probe
from safegate.modeling.streamers import SkipSafetyTokenStreamer
from safegate.modeling.tokens import add_safety_tokens, text_tokenizer, word_rows

SAFE, UNSAFE = "safe", "unsafe"
_SINGLE_STEP_DROPS = (
    "max_new_tokens", "min_new_tokens", "max_length", "min_length", "do_sample", "streamer", "num_return_sequences",
)  # fmt: skip
_UNSUPPORTED = {
    "num_beams": "beam search is not supported with a safety gate; use greedy decoding or sampling",
    "assistant_model": "assisted decoding is not supported with a safety gate",
    "prompt_lookup_num_tokens": "prompt-lookup decoding is not supported with a safety gate",
    "prefill_chunk_size": "chunked prefill is not supported: the gate must see the whole prompt at once",
    **dict.fromkeys(CACHE_KWARGS, "a user-supplied cache is not supported: the gate must see the whole prompt"),
}


@dataclass
class _Verdict:
    """What the gate decided for one call."""

    p_unsafe: torch.Tensor | None = None
    unsafe: torch.Tensor | None = None
    scores: torch.Tensor | None = None  # speculative path: raw logits at the safety step, when they were computed
    last_states: torch.Tensor | None = None  # speculative path: final states at the safety step

    @property
    def labels(self) -> list[str]:
        assert self.unsafe is not None
        return [UNSAFE if u else SAFE for u in self.unsafe.tolist()]


def quiet_get_peft_model(model: nn.Module, config: Any) -> PeftModel:
    """`peft.get_peft_model` without the FutureWarning peft raises by reading transformers' deprecated
    `is_gradient_checkpointing` property (nothing for a user to act on)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        return get_peft_model(model, config)


class SafeGateModel(nn.Module):
    """A model that first emits a safety token (`safe`/`unsafe`) chosen by a CASA gate, then answers.

    Built by composition with `attach()`; the wrapped Hugging Face model keeps its class. `parameters()` with
    `requires_grad=True` are exactly what training may change: LoRA on the language model, the gate and the
    two token rows.
    """

    def __init__(self, model: nn.Module, tokenizer_or_processor: Any, config: GateConfig | None = None) -> None:
        super().__init__()
        config = config or GateConfig()
        if not isinstance(config, GateConfig):
            raise TypeError(f"`config` must be a safegate.GateConfig, got {type(config).__name__}.")
        if isinstance(model, (SafeGateModel, PeftModel)):
            raise TypeError(
                f"`model` is a {type(model).__name__}; attach the gate to the plain Hugging Face model "
                "(call `.detach()` or `.unload()` first)."
            )
        self.gate_config = config
        self.processor = tokenizer_or_processor
        self.tokenizer = text_tokenizer(tokenizer_or_processor)
        self.__dict__["_original"] = model  # not a submodule: parameters() come from peft_model
        self._thread_state = threading.local()
        self._detached = False

        arch = resolve(model, config.lora_target, config.lora_modules)
        self._requires_grad = {n: p.requires_grad for n, p in arch.root.named_parameters()}
        self.safe_token_id, self.unsafe_token_id = add_safety_tokens(
            self.tokenizer, config.safe_token, config.unsafe_token
        )
        self._original_rows = arch.embed.weight.shape[0]
        if max(self.safe_token_id, self.unsafe_token_id) >= self._original_rows:
            arch.root.resize_token_embeddings(max(self.safe_token_id, self.unsafe_token_id) + 1, mean_resizing=False)
            arch = resolve(model, config.lora_target, config.lora_modules)  # embeddings may be new modules
        self.arch = arch
        self._embed_name = arch.module_name(arch.embed)
        self._head_name = arch.module_name(arch.head)
        self.__dict__["_tap_module"] = arch.tap_module(config.layer)
        query = self._descriptor_query(config.descriptor)
        rows = self._initial_rows()
        self.peft_model = quiet_get_peft_model(arch.root, self._peft_config())
        speed_up_trainable_tokens(self.peft_model)
        self._set_token_rows(rows)
        self.gate = SafetyGate(
            query.shape[-1], query, config.attention_dim, config.aggregation, config.train_query
        ).to(query.device)
        self._header = assistant_header(self.tokenizer, tokenizer_or_processor)
        self._special_ids = special_ids(self.tokenizer) - {self.safe_token_id, self.unsafe_token_id}
        training = arch.root.training
        self.train(False)
        self._support = probe(self)
        self.train(training)

    # ----------------------------------------------------------------------------------------------- setup
    def _peft_config(self) -> LoraConfig | TrainableTokensConfig:
        ids = [self.safe_token_id, self.unsafe_token_id]
        names = [self._embed_name] if self.arch.tied else [self._embed_name, self._head_name]
        if self.gate_config.lora_r == 0:
            return TrainableTokensConfig(target_modules=names, token_indices=ids)
        return LoraConfig(
            r=self.gate_config.lora_r,
            lora_alpha=self.gate_config.lora_alpha,
            lora_dropout=self.gate_config.lora_dropout,
            target_modules=self.arch.lora_target,
            trainable_token_indices={name: ids for name in names},
            task_type="CAUSAL_LM",
        )

    @torch.no_grad()
    def _descriptor_query(self, descriptor: str) -> torch.Tensor:
        """Mean tapped state of the frozen base model over the descriptor sentence (the query `q`)."""
        device = self.arch.embed.weight.device
        enc = self.tokenizer(descriptor, return_tensors="pt")
        with HiddenStateTap(self._tap_module) as tap:
            self.arch.root(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device))
        assert tap.states is not None
        return tap.states[0].float().mean(0)

    def _initial_rows(self) -> dict[str, torch.Tensor]:
        rows = {}
        for name, module in (("embed", self.arch.embed), ("head", self.arch.head)):
            rows[name] = torch.stack([word_rows(module.weight, self.tokenizer, w) for w in (SAFE, UNSAFE)])
        return rows

    @torch.no_grad()
    def _set_token_rows(self, rows: dict[str, torch.Tensor]) -> None:
        for name, layer in self._token_layers().items():
            delta = layer.trainable_tokens_delta["default"]
            delta.copy_(rows[name].to(delta.dtype))

    def _token_layers(self) -> dict[str, nn.Module]:
        """PEFT trainable-token layers: `embed` and, for untied heads, `head`."""
        found = {}
        for name, module in self.peft_model.named_modules():
            if type(module).__name__ == "TrainableTokensLayer" and "default" in module.trainable_tokens_delta:
                if getattr(module, "tied_adapter", None) is not None:
                    continue
                key = "embed" if name.removesuffix(".token_adapter").endswith(self._embed_name) else "head"
                found[key] = module
        return found

    # --------------------------------------------------------------------------------------- drop-in surface
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or "peft_model" not in self._modules:
                raise
            return getattr(self._modules["peft_model"], name)

    @property
    def config(self) -> Any:
        """The backbone's transformers config (what pipelines and Trainer read)."""
        return self.arch.root.config

    @property
    def generation_config(self) -> GenerationConfig:
        return self.arch.root.generation_config

    @property
    def device(self) -> torch.device:
        return self.arch.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.arch.embed.weight.dtype

    def can_generate(self) -> bool:
        return True

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Plain forward of the adapted backbone (LoRA and token rows active, no gate)."""
        self._check_attached()
        return self.peft_model(*args, **kwargs)

    @property
    def speculative(self) -> bool:
        """Whether `generate` may speculate the safety token on this model (it is causal: `modeling.speculative`)."""
        return self._support.causal

    @property
    def last_safety(self) -> list[str] | None:
        """Verdicts of this thread's most recent `generate` call (useful when it returned plain ids)."""
        return getattr(self._thread_state, "labels", None)

    # -------------------------------------------------------------------------------------------- gate math
    def gate_logit(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Gate logit `x` (v_s = sigmoid(x)) from tapped prompt states and the prompt mask."""
        mask = repeat_rows(mask, hidden.shape[0] // mask.shape[0])  # num_return_sequences expands rows
        if hidden.shape[1] != mask.shape[1]:
            raise RuntimeError(
                f"the gate saw {hidden.shape[1]} prompt positions but the attention mask has {mask.shape[1]}"
            )
        return self.gate(hidden, mask.to(hidden.device))

    def gated_pair(self, logits: torch.Tensor, gate_logit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gated (safe, unsafe) logits from full-vocabulary logits at the safety step."""
        return gate_pair_logits(
            logits[:, self.safe_token_id], logits[:, self.unsafe_token_id], gate_logit, self.gate_config.scaling
        )

    @contextlib.contextmanager
    def tap(self) -> Iterator[HiddenStateTap]:
        """Capture the gate's input states during one forward in this thread (used by training)."""
        with HiddenStateTap(self._tap_module) as tap:
            yield tap

    def decide(
        self, scores: torch.Tensor, states: torch.Tensor, mask: torch.Tensor, threshold: float | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(p_unsafe, unsafe)` per row from the logits at the safety step and the tapped prompt states."""
        return self.decide_pair(
            scores[:, self.safe_token_id], scores[:, self.unsafe_token_id], states, mask, threshold
        )

    def decide_pair(
        self,
        z_safe: torch.Tensor,
        z_unsafe: torch.Tensor,
        states: torch.Tensor,
        mask: torch.Tensor,
        threshold: float | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(p_unsafe, unsafe)` per row from the raw (safe, unsafe) logits and the tapped prompt states."""
        z_safe, z_unsafe = gate_pair_logits(z_safe, z_unsafe, self.gate_logit(states, mask), self.gate_config.scaling)
        p = unsafe_probability(z_safe, z_unsafe)
        unsafe = p >= threshold if threshold is not None else z_unsafe >= z_safe
        return p, unsafe | p.isnan()  # a score that is not a number fails closed

    def _decide(self, tap: HiddenStateTap, mask: torch.Tensor, threshold: float | None, verdict: _Verdict) -> Any:
        def decide(scores: torch.Tensor) -> torch.Tensor:
            if tap.states is None:
                raise RuntimeError("the hidden-state tap saw no prefill pass; the gate cannot decide")
            verdict.p_unsafe, verdict.unsafe = self.decide(scores, tap.states, mask, threshold)
            ids = torch.tensor([self.safe_token_id, self.unsafe_token_id], device=scores.device)
            return ids[verdict.unsafe.long()]

        return decide

    # ------------------------------------------------------------------------------------------ generation
    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        safety_threshold: float | None = None,
        keep_safety_token: bool = False,
        speculative: bool = True,
        **kwargs: Any,
    ) -> Any:
        """Drop-in for `model.generate`: safety token first (decided, never sampled), then the answer.

        Args:
            safety_threshold (`float | None`): unsafe iff p(unsafe) >= threshold; `None` = config default,
                and if that is `None` too, the argmax of the gated pair.
            keep_safety_token (`bool`): keep the safety token in the returned ids (streamers never show it).
            speculative (`bool`): prefill `prompt, <|safe|>` and decide in that same pass, so a safe answer starts
                as fast as without a gate (see `modeling.speculative`); an unsafe verdict costs one decode step.
                `False`: the safety token is a decode step of its own. The verdict is the same either way.
            **kwargs: anything `model.generate` accepts. `max_new_tokens` counts answer tokens only.

        Returns:
            Token ids, or with `return_dict_in_generate=True` the usual output object plus `.safety`
            (`"safe"`/`"unsafe"` per row) and `.safety_scores` (p(unsafe) per row after the gate).
        """
        self._check_attached()
        threshold = check_threshold(
            safety_threshold if safety_threshold is not None else self.gate_config.threshold, "safety_threshold"
        )
        kwargs = self._normalise_kwargs(kwargs)
        input_ids, attention_mask = self._check_inputs(input_ids, attention_mask, kwargs)
        want_dict = kwargs.pop("return_dict_in_generate", None)
        if want_dict is None:
            want_dict = bool((kwargs.get("generation_config") or self.generation_config).return_dict_in_generate)
        lengths = [0] * (input_ids.shape[0] if input_ids is not None else 0)
        if input_ids is not None and self._header is not None:
            mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
            lengths = prefix_lengths(input_ids, mask, self._header, self._special_ids)
        if speculative and self.speculative and input_ids is not None:
            args = (input_ids, attention_mask, lengths, threshold, keep_safety_token, kwargs)
            out = generate_speculatively(self, *args)
            return out if want_dict else out.sequences
        if any(lengths):
            out = self._generate_after_prefix(input_ids, attention_mask, lengths, threshold, keep_safety_token, kwargs)
            return out if want_dict else out.sequences
        self._extend_length_budget(kwargs)
        out = self._generate_gated(input_ids, attention_mask, threshold, keep_safety_token, kwargs)
        return out if want_dict else out.sequences

    @torch.no_grad()
    def classify(
        self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> torch.Tensor:
        """p(unsafe) per row (B,), exactly the score `generate` would decide on; nothing is generated."""
        self._check_attached()
        kwargs = self._normalise_kwargs(kwargs)
        kwargs = {k: v for k, v in kwargs.items() if k not in _SINGLE_STEP_DROPS + ("logits_processor",)}
        input_ids, attention_mask = self._check_inputs(input_ids, attention_mask, kwargs)
        if input_ids is not None and self._header is not None:
            lengths = prefix_lengths(input_ids, attention_mask, self._header, self._special_ids)
            if any(lengths):
                input_ids, attention_mask, kwargs = self._strip_prefix(input_ids, attention_mask, lengths, kwargs)
        out = self._generate_gated(
            input_ids, attention_mask, None, True, dict(kwargs, max_new_tokens=1, do_sample=False)
        )
        return out.safety_scores

    def _generate_gated(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        threshold: float | None,
        keep_safety_token: bool,
        kwargs: dict[str, Any],
    ) -> Any:
        prompt_length = input_ids.shape[1] if input_ids is not None else 0
        mask = attention_mask
        if mask is None:
            embeds = kwargs.get("inputs_embeds")
            shape = input_ids.shape if input_ids is not None else embeds.shape[:2]
            mask = torch.ones(shape, dtype=torch.long, device=self.device)
        verdict = _Verdict()
        processors = LogitsProcessorList(kwargs.pop("logits_processor", None) or [])
        if kwargs.get("streamer") is not None:
            kwargs["streamer"] = SkipSafetyTokenStreamer(kwargs["streamer"])
        with HiddenStateTap(self._tap_module) as tap:
            processors.append(SafeGateLogitsProcessor(prompt_length, self._decide(tap, mask, threshold, verdict)))
            out = self.base_generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                logits_processor=processors,
                return_dict_in_generate=True,
                **kwargs,
            )
        if verdict.unsafe is None:
            raise RuntimeError("generation ended before the safety step; the gate did not run")
        if not keep_safety_token:
            seq = out.sequences
            out.sequences = torch.cat([seq[:, :prompt_length], seq[:, prompt_length + 1 :]], dim=1)
            for name in ("scores", "logits"):
                if getattr(out, name, None) is not None:
                    setattr(out, name, getattr(out, name)[1:])
        return self._attach_verdict(out, verdict)

    def base_generate(self, **kwargs: Any) -> Any:
        """The adapted model's own `generate` (LoRA and token rows active, no gate).

        LoRA and trainable tokens live inside the backbone's modules, so its `generate` runs them directly; PEFT's
        wrapper around it only adds per-step work (it re-parses library versions at every step). The prefill's head
        gets a contiguous input (`ContiguousHeadInput`: frozen weights would otherwise take a slow batched product).
        """
        with ContiguousHeadInput(self.arch.root.get_output_embeddings()):
            return self.arch.root.generate(**kwargs)

    def _attach_verdict(self, out: Any, verdict: _Verdict) -> Any:
        out.safety = verdict.labels
        out.safety_scores = verdict.p_unsafe
        self._thread_state.labels = out.safety
        return out

    def _generate_after_prefix(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        lengths: list[int],
        threshold: float | None,
        keep_safety_token: bool,
        kwargs: dict[str, Any],
    ) -> Any:
        """Decide on the prompt without the assistant prefix, then feed `prompt, safety token, prefix`.

        With `GateConfig.unsafe_prefix="drop"` (default) rows judged unsafe get `prompt, safety token` only: an
        attacker-written prefix is never fed after `<|unsafe|>`, so the answer starts from the refusal.
        """
        p_ids, p_mask, p_kwargs = self._strip_prefix(input_ids, attention_mask, lengths, kwargs)
        classify_kwargs = {k: v for k, v in p_kwargs.items() if k not in _SINGLE_STEP_DROPS + ("logits_processor",)}
        scored = self._generate_gated(
            p_ids, p_mask, threshold, True, dict(classify_kwargs, max_new_tokens=1, do_sample=False)
        )
        verdict = _Verdict(scored.safety_scores, torch.tensor([s == UNSAFE for s in scored.safety]))
        tokens = torch.where(verdict.unsafe, self.unsafe_token_id, self.safe_token_id).tolist()
        drop = self.gate_config.unsafe_prefix == "drop"
        keep = [not (drop and unsafe) for unsafe in verdict.unsafe.tolist()]
        new_ids, new_mask, new_kwargs = self._insert_tokens(input_ids, attention_mask, lengths, tokens, kwargs, keep)
        if new_kwargs.get("streamer") is not None:
            new_kwargs["streamer"] = SkipSafetyTokenStreamer(new_kwargs["streamer"], prompt=input_ids)
        out = self.base_generate(
            input_ids=new_ids, attention_mask=new_mask, return_dict_in_generate=True, **new_kwargs
        )
        per_prompt = out.sequences.shape[0] // input_ids.shape[0]  # num_return_sequences: one verdict per sequence
        verdict = _Verdict(repeat_rows(verdict.p_unsafe, per_prompt), repeat_rows(verdict.unsafe, per_prompt))
        input_ids = repeat_rows(input_ids, per_prompt)
        if not keep_safety_token:
            out.sequences = torch.cat([input_ids, out.sequences[:, new_ids.shape[1] :]], dim=1)
        return self._attach_verdict(out, verdict)

    # ------------------------------------------------------------------------------------------ helpers
    def _normalise_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        prefix = self.arch.spec.kwarg_prefix
        if prefix:
            kwargs = {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in kwargs.items()}
        gen_config = kwargs.get("generation_config") or self.generation_config
        for key, why in _UNSUPPORTED.items():
            value = kwargs.get(key, getattr(gen_config, key, None))
            if value is not None and not (key == "num_beams" and value == 1):
                raise ValueError(f"`{key}={value!r}`: {why}.")
        if kwargs.get("cache_implementation") == "paged":
            raise ValueError("`cache_implementation='paged'` (continuous batching) is not supported by the gate.")
        return dict(kwargs)

    def _check_inputs(
        self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, kwargs: dict[str, Any]
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if input_ids is None and kwargs.get("inputs_embeds") is None:
            raise ValueError("pass `input_ids` (or `inputs_embeds`), e.g. `gated.generate(**tokenizer(text, ...))`.")
        check_required_inputs(self.arch.spec, kwargs)
        if input_ids is not None:
            input_ids = torch.as_tensor(input_ids, device=self.device)
            if input_ids.dim() == 1:
                input_ids = input_ids.unsqueeze(0)
            ids = torch.tensor([self.safe_token_id, self.unsafe_token_id], device=input_ids.device)
            if bool(torch.isin(input_ids, ids).any()):
                raise ValueError(
                    "the prompt's `input_ids` already contain a safety token id "
                    f"({self.safe_token_id} or {self.unsafe_token_id}): this is an injection attempt and is refused. "
                    "Text is never tokenized to these ids; only hand-built ids can hold them."
                )
        if attention_mask is not None:
            attention_mask = torch.as_tensor(attention_mask, device=self.device)
            if attention_mask.dim() == 1:
                attention_mask = attention_mask.unsqueeze(0)
            if bool((attention_mask[:, -1] == 0).any()):
                raise ValueError(
                    "`attention_mask` shows right padding: the gate would read a pad position. "
                    "Pad on the left (`tokenizer.padding_side = 'left'`)."
                )
        return input_ids, attention_mask

    def _extend_length_budget(self, kwargs: dict[str, Any]) -> None:
        """The safety token is one extra new token: keep the caller's answer budget unchanged."""
        gen_config = kwargs.get("generation_config") or self.generation_config
        if kwargs.get("max_new_tokens") is not None:
            kwargs["max_new_tokens"] += 1
        elif kwargs.get("max_length") is not None:
            kwargs["max_length"] += 1
        elif gen_config.max_new_tokens is not None:
            kwargs["max_new_tokens"] = gen_config.max_new_tokens + 1
        else:
            kwargs["max_length"] = gen_config.max_length + 1
        for key in ("min_new_tokens", "min_length"):
            value = kwargs.get(key, getattr(gen_config, key, None))
            if value:
                kwargs[key] = value + 1

    def _count_safety_token_in_length(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The safety token is part of the input: total-length budgets (`max_length`, `min_length`) grow by one."""
        gen_config = kwargs.get("generation_config") or self.generation_config
        kwargs = dict(kwargs)
        if kwargs.get("max_new_tokens") is None and gen_config.max_new_tokens is None:
            kwargs["max_length"] = (kwargs.get("max_length") or gen_config.max_length) + 1
        if kwargs.get("min_new_tokens") is None and not gen_config.min_new_tokens:
            value = kwargs.get("min_length", gen_config.min_length)
            if value:
                kwargs["min_length"] = value + 1
        return kwargs

    def _per_token_kwargs(self, input_ids: torch.Tensor, kwargs: dict[str, Any]) -> list[str]:
        return [
            k
            for k, v in kwargs.items()
            if k not in MULTIMODAL_INPUTS and isinstance(v, torch.Tensor) and v.shape[:2] == input_ids.shape
        ]

    def _strip_prefix(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, lengths: list[int], kwargs: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        keys = self._per_token_kwargs(input_ids, kwargs)
        out_kwargs = dict(kwargs)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

        def cut(t: torch.Tensor, value: int) -> torch.Tensor:
            return left_pad([row[: row.shape[0] - k] for row, k in zip(t, lengths)], value)

        for key in keys:
            out_kwargs[key] = cut(kwargs[key], 0)
        return cut(input_ids, pad), cut(attention_mask, 0), out_kwargs

    def _insert_tokens(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        lengths: list[int],
        tokens: list[int],
        kwargs: dict[str, Any],
        keep: list[bool],
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """Per row: `prompt, token, prefix` (or `prompt, token` where `keep` is False), left-padded."""
        keys = self._per_token_kwargs(input_ids, kwargs)
        out_kwargs = dict(kwargs)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

        def insert(t: torch.Tensor, values: list[int] | None, value_pad: int, key: str = "") -> torch.Tensor:
            """`values=None`: the per-token input `key`'s own value for an inserted token (`inserted_token_value`)."""
            rows = []
            for i, (row, k, kept) in enumerate(zip(t, lengths, keep)):
                cut = row.shape[0] - k
                if values is None:
                    new, shift = inserted_token_value(key, row[max(cut - 1, 0) : cut])
                    tail = row[cut:] + shift
                else:
                    new, tail = row.new_tensor([values[i]]), row[cut:]
                rows.append(torch.cat([row[:cut], new, tail if kept else row[:0]]))
            return left_pad(rows, value_pad)

        for key in keys:
            out_kwargs[key] = insert(kwargs[key], None, 0, key)
        return insert(input_ids, tokens, pad), insert(attention_mask, [1] * len(tokens), 0), out_kwargs

    # ------------------------------------------------------------------------------- bundles, LoRA merging
    def save_bundle(self, path: str, **kwargs: Any) -> Any:
        """Write the small safetensors bundle (see `safegate.hub.bundle.save_bundle`)."""
        from safegate.hub.bundle import save_bundle

        return save_bundle(self, path, **kwargs)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> Any:
        """Upload the bundle to the Hugging Face Hub (see `safegate.hub.bundle.push_to_hub`)."""
        from safegate.hub.bundle import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)

    def merge_adapter(self) -> None:
        """Merge LoRA into the base weights for faster inference (PEFT naming; undo with `unmerge_adapter`)."""
        self._check_attached()
        if not self.merged:
            self.peft_model.merge_adapter()

    def unmerge_adapter(self) -> None:
        """Undo `merge_adapter`, restoring separate LoRA weights (needed before training or `detach`)."""
        self._check_attached()
        if self.merged:
            self.peft_model.unmerge_adapter()

    @property
    def merged(self) -> bool:
        """Whether LoRA and the token rows are currently merged into the base weights."""
        return any(getattr(m, "merged", False) for m in self.peft_model.modules() if hasattr(m, "merged_adapters"))

    # --------------------------------------------------------------------------------------------- detach
    def _check_attached(self) -> None:
        if self._detached:
            raise RuntimeError("this SafeGateModel was detached; call safegate.attach(model, tokenizer) again.")

    def detach(self) -> nn.Module:
        """Remove LoRA, token rows and any resize; return the original model exactly as before `attach()`."""
        self._check_attached()
        self.unmerge_adapter()
        root = self.peft_model.unload()
        if root.get_input_embeddings().weight.shape[0] != self._original_rows:
            root.resize_token_embeddings(self._original_rows, mean_resizing=False)
        for name, param in root.named_parameters():
            param.requires_grad_(self._requires_grad.get(name, param.requires_grad))
        self._detached = True
        del self._modules["peft_model"]
        return self._original


def attach(model: nn.Module, tokenizer_or_processor: Any, config: GateConfig | None = None) -> SafeGateModel:
    """Attach a CASA safety gate to `model` in one call; see `SafeGateModel`.

    Example:
        >>> import safegate
        >>> from safegate.testing import tiny_model_and_tokenizer
        >>> model, tok = tiny_model_and_tokenizer("llama")
        >>> gated = safegate.attach(model, tok, safegate.GateConfig(attention_dim=16, lora_r=4))
        >>> float(gated.classify(**tok(["hello"], return_tensors="pt"))[0]) <= 1.0
        True
    """
    return SafeGateModel(model, tokenizer_or_processor, config)
