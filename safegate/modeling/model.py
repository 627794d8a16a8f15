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
import os
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from peft import LoraConfig, PeftModel, TrainableTokensConfig, get_peft_model
from torch import nn
from transformers import GenerationConfig

from safegate.modeling.arch import ResolvedArch, resolve
from safegate.modeling.base_answer import generate_with_base_answers
from safegate.modeling.config import GateConfig, check_threshold
from safegate.modeling.gate import gate_pair_logits, unsafe_probability
from safegate.modeling.gate_ensemble import build_gate
from safegate.modeling.guards import prepare_prompt, restore_caller_ids
from safegate.modeling.hooks import ContiguousHeadInput, HiddenStateTap
from safegate.modeling.inputs import extend_length_budget, normalise_generate_kwargs, single_step_kwargs, strip_prefix
from safegate.modeling.lifecycle import AttachRollback, GateLifecycle, check_attachable
from safegate.modeling.peft_tokens import speed_up_trainable_tokens, token_layers
from safegate.modeling.prefix import repeat_rows
from safegate.modeling.speculative import SpeculationSupport, generate_speculatively, probe_speculation_support
from safegate.modeling.stepwise import closed_turn_floor, generate_after_prefix, generate_stepwise
from safegate.modeling.tokens import add_safety_tokens, padding_id, text_tokenizer, word_rows
from safegate.modeling.turns import ChatMarkers, chat_markers
from safegate.modeling.verdict import SAFE, UNSAFE


def quiet_get_peft_model(model: nn.Module, config: Any) -> PeftModel:
    """`peft.get_peft_model` without the FutureWarning peft raises by reading transformers' deprecated
    `is_gradient_checkpointing` property (nothing for a user to act on)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        return get_peft_model(model, config)


class SafeGateModel(GateLifecycle, nn.Module):
    """A model that first emits a safety token (`safe`/`unsafe`) chosen by a CASA gate, then answers.

    Built by composition with `attach()`; the wrapped Hugging Face model keeps its class. `parameters()` with
    `requires_grad=True` are exactly what training may change: LoRA on the language model, the gate and the
    two token rows. Merging, detaching, copying and pickling: `modeling.lifecycle.GateLifecycle`.

    `save_bundle` / `push_to_hub` write through `bundle_class`, which `safegate.hub.bundle` registers when it is
    imported (importing `safegate` does that): the inference core itself imports nothing from the hub layer.
    """

    #: The bundle type `save_bundle` and `push_to_hub` write (`safegate.hub.bundle.SafeGateBundle`, registered there).
    bundle_class: ClassVar[type | None] = None
    #: The writer `save_merged` calls (`safegate.hub.merged.save_merged`, registered there).
    merged_writer: ClassVar[Callable[[SafeGateModel, str | os.PathLike], Path] | None] = None

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
        check_attachable(model)  # nothing is touched before this: a gated or compiled model is refused
        self.gate_config = config
        self.processor = tokenizer_or_processor
        self.tokenizer = text_tokenizer(tokenizer_or_processor)
        self.__dict__["_original"] = model  # not a submodule: parameters() come from peft_model
        self._thread_state = threading.local()
        self._detached = False
        arch = resolve(model, config.lora_target, config.lora_modules)
        rollback = AttachRollback(model, arch.root, self.tokenizer, (config.safe_token, config.unsafe_token))
        try:
            self._attach(model, arch, tokenizer_or_processor)
        except BaseException:  # model and tokenizer exactly as they were
            rollback.restore(self._modules.get("peft_model"))
            raise

    def _attach(self, model: nn.Module, arch: ResolvedArch, tokenizer_or_processor: Any) -> None:
        config = self.gate_config
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
        self.gate = build_gate(query.shape[-1], query, config).to(query.device)
        self._markers = chat_markers(self.tokenizer, tokenizer_or_processor)
        self._header = list(self._markers.header) if self._markers is not None else None
        training = arch.root.training
        self.train(False)
        self._support = probe_speculation_support(self)
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
        for name, layer in self.token_layers().items():
            delta = layer.trainable_tokens_delta["default"]
            delta.copy_(rows[name].to(delta.dtype))

    def token_layers(self) -> dict[str, nn.Module]:
        """PEFT trainable-token layers holding the two rows: `embed` and, for untied heads, `head`."""
        return token_layers(self.peft_model, self._embed_name, self._head_name)

    # ------------------------------------------------------------------------------------ read-only views
    @property
    def original_model(self) -> nn.Module:
        """The model `attach()` was given (what `detach()` returns); not a submodule."""
        return self._original

    @property
    def original_vocab_rows(self) -> int:
        """Embedding rows before `attach()` (it resizes only when a safety id falls outside them)."""
        return self._original_rows

    @property
    def embed_module_name(self) -> str:
        """Path of the input embedding inside the gated module (`arch.root`)."""
        return self._embed_name

    @property
    def head_module_name(self) -> str:
        """Path of the output head inside the gated module (`arch.root`)."""
        return self._head_name

    @property
    def assistant_header_ids(self) -> list[int] | None:
        """Ids the chat template appends for `add_generation_prompt=True` (`None`: no prefix detection)."""
        return self._header

    @property
    def chat_markers(self) -> ChatMarkers | None:
        """Where the chat template puts the assistant header (`modeling.turns`; `None`: no prefix detection)."""
        return self._markers

    @property
    def tap_module(self) -> nn.Module:
        """The module whose output states the gate reads (the final norm, or `GateConfig.layer`)."""
        return self._tap_module

    @property
    def speculation_support(self) -> SpeculationSupport:
        """What `modeling.speculative.probe_speculation_support` found for this model at attach time."""
        return self._support

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

    @property
    def last_verdict(self) -> tuple[list[str], torch.Tensor] | None:
        """`(labels, p_unsafe)` per row of this thread's most recent `generate`/`classify` call (pipelines read it)."""
        labels, scores = getattr(self._thread_state, "labels", None), getattr(self._thread_state, "scores", None)
        return None if labels is None or scores is None else (labels, scores)

    # -------------------------------------------------------------------------------------------- gate math
    def gate_logit(self, hidden: torch.Tensor, mask: torch.Tensor, *, members: bool = False) -> torch.Tensor:
        """Gate logit `x` (v_s = sigmoid(x)) from tapped prompt states and the prompt mask; `(B,)`, or each member's
        `(B, members)` with `members=True` (training: every member learns on its own loss)."""
        mask = repeat_rows(mask, hidden.shape[0] // mask.shape[0])  # num_return_sequences expands rows
        if hidden.shape[1] != mask.shape[1]:
            raise RuntimeError(
                f"the gate saw {hidden.shape[1]} prompt positions but the attention mask has {mask.shape[1]}"
            )
        mask = mask.to(hidden.device)
        return self.gate.member_logits(hidden, mask) if members else self.gate(hidden, mask)

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
                Not used with `GateConfig.safe_answer="base"` (`modeling.base_answer`).
            **kwargs: anything `model.generate` accepts. `max_new_tokens` counts answer tokens only.

        Returns:
            Token ids, or with `return_dict_in_generate=True` the usual output object plus `.safety`
            (`"safe"`/`"unsafe"` per row) and `.safety_scores` (p(unsafe) per row after the gate).
        """
        self._check_attached()
        threshold = check_threshold(
            safety_threshold if safety_threshold is not None else self.gate_config.threshold, "safety_threshold"
        )
        kwargs = normalise_generate_kwargs(kwargs, self.arch.spec.kwarg_prefix, self.generation_config)
        prompt = prepare_prompt(self, input_ids, attention_mask, kwargs)
        kwargs, lengths = prompt.kwargs, prompt.lengths
        want_dict = kwargs.pop("return_dict_in_generate", None)
        if want_dict is None:
            want_dict = bool((kwargs.get("generation_config") or self.generation_config).return_dict_in_generate)
        input_ids, attention_mask = prompt.input_ids, prompt.attention_mask
        if any(lengths) and "inputs_embeds" in kwargs:
            raise ValueError("an assistant prefix with `inputs_embeds` is not supported: pass `input_ids` only.")
        floor = closed_turn_floor(self, input_ids, attention_mask, prompt.closed, threshold, kwargs)
        args = (input_ids, attention_mask, lengths, threshold, keep_safety_token, kwargs, floor)
        if self.gate_config.safe_answer == "base":
            if input_ids is None or "inputs_embeds" in kwargs:
                raise ValueError(
                    "GateConfig.safe_answer='base' answers from the prompt's token ids: pass `input_ids` (not "
                    "`inputs_embeds`), or use a gate with safe_answer='adapted'."
                )
            out = generate_with_base_answers(self, *args)
        elif speculative and self.speculative and input_ids is not None and "inputs_embeds" not in kwargs:
            out = generate_speculatively(self, *args)
        elif any(lengths):
            out = generate_after_prefix(self, *args)
        else:
            kwargs = extend_length_budget(kwargs, self.generation_config)
            out = generate_stepwise(self, input_ids, attention_mask, threshold, keep_safety_token, kwargs)
        out = restore_caller_ids(out, prompt, keep_safety_token)
        self._thread_state.labels, self._thread_state.scores = out.safety, out.safety_scores
        return out if want_dict else out.sequences

    @torch.no_grad()
    def classify(
        self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> torch.Tensor:
        """p(unsafe) per row (B,), exactly the score `generate` would decide on; nothing is generated."""
        self._check_attached()
        kwargs = normalise_generate_kwargs(kwargs, self.arch.spec.kwarg_prefix, self.generation_config)
        prompt = prepare_prompt(self, input_ids, attention_mask, single_step_kwargs(kwargs))
        input_ids, attention_mask, kwargs = prompt.input_ids, prompt.attention_mask, prompt.kwargs
        floor = closed_turn_floor(self, input_ids, attention_mask, prompt.closed, None, kwargs)
        if any(prompt.lengths):
            pad_id = padding_id(self.tokenizer)
            input_ids, attention_mask, kwargs = strip_prefix(input_ids, attention_mask, prompt.lengths, kwargs, pad_id)
        out = generate_stepwise(self, input_ids, attention_mask, None, True, kwargs, floor)
        self._thread_state.labels, self._thread_state.scores = out.safety, out.safety_scores
        return out.safety_scores

    def base_generate(self, **kwargs: Any) -> Any:
        """The adapted model's own `generate` (LoRA and token rows active, no gate).

        LoRA and trainable tokens live inside the backbone's modules, so its `generate` runs them directly; PEFT's
        wrapper around it only adds per-step work (it re-parses library versions at every step). The prefill's head
        gets a contiguous input (`ContiguousHeadInput`: frozen weights would otherwise take a slow batched product).
        """
        with ContiguousHeadInput(self.arch.root.get_output_embeddings()):
            return self.arch.root.generate(**kwargs)

    # ------------------------------------------------------------------------------- bundles, LoRA merging
    def save_bundle(
        self, path: str | os.PathLike, *, recipe: str | None = None, evaluation: Mapping | Sequence | None = None
    ) -> Path:
        """Write the small safetensors bundle to the folder `path` atomically; return the folder.

        Arguments as `safegate.hub.bundle.save_bundle`; the format is `docs/bundle-format.md`.
        """
        bundle = self._require_bundle_class().from_model(self, recipe=recipe, evaluation=evaluation)
        bundle.save_pretrained(path)
        return Path(path)

    def save_merged(self, path: str | os.PathLike) -> Path:
        """Write a plain Hugging Face checkpoint (LoRA merged, safety tokens in) plus the gate to `path`; return it.

        Format and loading back (`safegate.load_merged`): `docs/serving.md`, "Merged export". `self` is not modified.
        """
        if type(self).merged_writer is None:
            raise RuntimeError(
                "no merged writer is registered: `import safegate.hub.merged` (`import safegate` does)."
            )
        return type(self).merged_writer(self, path)

    def push_to_hub(
        self, repo_id: str, *, recipe: str | None = None, evaluation: Mapping | Sequence | None = None, **kwargs: Any
    ) -> str:
        """Upload the bundle to the Hub repo `repo_id` in one commit; return the commit URL.

        `kwargs` go to `ModelHubMixin.push_to_hub` (`private`, `token`, `commit_message`, `branch`, ...).
        """
        kwargs.setdefault("commit_message", "Upload safegate bundle")
        bundle = self._require_bundle_class().from_model(self, recipe=recipe, evaluation=evaluation)
        return bundle.push_to_hub(repo_id, **kwargs)

    @classmethod
    def _require_bundle_class(cls) -> Any:
        if cls.bundle_class is None:
            raise RuntimeError(
                "no bundle format is registered: `import safegate.hub.bundle` first (`import safegate` does it)."
            )
        return cls.bundle_class


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
