"""`GatedLLM`: offline batches on vLLM with the exact CASA verdict of the transformers path.

One-pass by default (`serving.one_pass`): the generating engine's own model runs the gate in the prefill of each
prompt and starts the answer with the decided safety token, which `serving.forced_token` takes off the output again
(the verdict and p(unsafe) come with it). A prompt with an attacker-written assistant prefix, and every prompt when
`one_pass=False`, takes the two-pass path, with a second engine started on first use.

Two-pass, on one merged export (`gated.save_merged(DIR)`): a pooling engine returns each prompt's final-norm states
(`token_embed`, no activation: the states the head projects, which the gate reads when `tapped_layer == -1`; for a
gate on an inner layer, that layer's states beside them: `serving.tap`); the
gate and the two head safety rows turn them into the verdict in this process (`hub.merged.merged_verdict`); the
generating engine then decodes from `prompt, decided safety token[, assistant prefix]`. The safety token is part of
the prompt, so the answer never holds it, and a sampled first token can never be a safety token. Why two passes and
what they cost: `docs/serving-vllm.md`.

vLLM is imported when a `GatedLLM` is built, never at `import safegate`. Scripts that build one need an
`if __name__ == "__main__":` guard (vLLM starts its engines in spawned processes).

Example (not run here: it needs vLLM and starts an engine):

    from vllm import SamplingParams
    from safegate.serving import GatedLLM

    llm = GatedLLM("my-merged-export", dtype="bfloat16", enforce_eager=True, max_model_len=2048)
    prompts = [llm.chat_prompt("How do I bake bread?")]
    out = llm.generate(prompts, SamplingParams(max_tokens=64, temperature=0))[0]
    out.verdict, out.p_unsafe, out.text
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from safegate.hub.merged import MergedGate, read_merged_gate
from safegate.modeling.config import check_threshold
from safegate.modeling.turns import chat_markers
from safegate.modeling.verdict import UNSAFE
from safegate.serving.checkpoint import check_engine_loadable, safety_head_rows
from safegate.serving.decide import POOLER_CONFIG, most_unsafe, pooling_params, states_verdict
from safegate.serving.forced_token import SafetyTokenStrip, UngatedOutput, one_pass_params
from safegate.serving.one_pass import engine_kwargs, export_architecture
from safegate.serving.plan import PromptPlan, plan_prompt
from safegate.serving.tap import EXTENSION_CLASS, INSTALL_METHOD

#: A prompt: text (tokenized as vLLM tokenizes it: the tokenizer's special tokens added), token ids, or a vLLM
#: prompt dict with `prompt` or `prompt_token_ids`.
Prompt = str | Sequence[int] | Mapping[str, Any]


@dataclass
class GatedOutput:
    """One prompt's result.

    Args:
        verdict (`str`): `"safe"` or `"unsafe"`.
        p_unsafe (`float`): p(unsafe) after the gate.
        text (`str`): The first completion's text (never the safety token).
        prompt_token_ids (`list[int]`): The prompt's ids as the gate read them.
        request_output (`Any`): vLLM's `RequestOutput` of the generation, its completions without the safety
            token (two-pass: its prompt ends with the decided token, and the assistant prefix where one is kept);
            `None` from `classify`.
    """

    verdict: str
    p_unsafe: float
    text: str
    prompt_token_ids: list[int]
    request_output: Any = None


class GatedLLM:
    """A merged export served by vLLM with its CASA verdict (see the module docstring).

    Args:
        path: folder written by `gated.save_merged` (or `safegate export --merged`).
        one_pass: decide in the generating engine's prefill (`serving.one_pass`; chunked prefill and prefix
            caching off); `False`: a pooling pass per prompt, then generation (both engines start here).
        pooling_kwargs: extra `vllm.LLM` arguments for the pooling engine only (e.g. a smaller KV cache).
        **llm_kwargs: `vllm.LLM` arguments for both engines (`dtype`, `max_model_len`, `tensor_parallel_size`, ...).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        one_pass: bool = True,
        pooling_kwargs: Mapping[str, Any] | None = None,
        **llm_kwargs: Any,
    ) -> None:
        from transformers import AutoTokenizer
        from vllm import LLM

        self.path = Path(path)
        self.gate: MergedGate = read_merged_gate(self.path)
        check_engine_loadable(self.path)
        self.rows = safety_head_rows(self.path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.markers = chat_markers(self.tokenizer)
        for key in ("runner", "model", "tokenizer", *(engine_kwargs("") if one_pass else ())):
            if key in llm_kwargs:
                raise ValueError(f"`{key}` is set by GatedLLM (the merged export, its runners, one-pass); drop it.")
        self.one_pass = one_pass
        self.llm_kwargs, self.pooling_kwargs = dict(llm_kwargs), dict(pooling_kwargs or {})
        self._pooler: Any = None
        if not one_pass:
            self.pooler  # noqa: B018 (started now, as before)
        extra = {}
        if one_pass:
            extra = engine_kwargs(export_architecture(self.path))
            if "VLLM_PLUGINS" in os.environ:  # an allow-list: the model class's registration must be on it
                plugins = [p for p in os.environ["VLLM_PLUGINS"].split(",") if p]
                os.environ["VLLM_PLUGINS"] = ",".join(dict.fromkeys([*plugins, "safegate"]))
        self.llm = LLM(model=str(self.path), **llm_kwargs, **extra)

    @property
    def pooler(self) -> Any:
        """The pooling engine of the two-pass path (started on first use when `one_pass`)."""
        if self._pooler is None:
            from vllm import LLM

            pooling = {"runner": "pooling", "pooler_config": dict(POOLER_CONFIG)}
            if self.gate.tapped_layer != -1:  # an inner layer: the pooling pass returns it beside the final states
                pooling["worker_extension_cls"] = EXTENSION_CLASS
            self._pooler = LLM(model=str(self.path), **{**self.llm_kwargs, **pooling, **self.pooling_kwargs})
            if self.gate.tapped_layer != -1:
                self._pooler.collective_rpc(INSTALL_METHOD, args=(self.gate.tapped_layer,))
        return self._pooler

    @property
    def safety_ids(self) -> tuple[int, int]:
        """The ids of the safe and the unsafe token."""
        return self.gate.safe_id, self.gate.unsafe_id

    def chat_prompt(self, user: str, system: str | None = None) -> str:
        """One user message as the chat template renders it, with the assistant header (the usual prompt)."""
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def plan(self, prompt: Prompt) -> PromptPlan:
        """The prompt's ids checked (no safety token id) and split at its assistant prefix (`serving.plan`)."""
        return plan_prompt(prompt_ids(self.tokenizer, prompt), self.safety_ids, self.markers, self.tokenizer)

    def decide(self, plans: Sequence[PromptPlan], threshold: float | None = None) -> list[tuple[str, float]]:
        """`(verdict, p_unsafe)` per plan: one pooling pass per id list a plan decides on, the gate here."""
        threshold = check_threshold(threshold, "threshold")
        passes = [ids for plan in plans for ids in plan.decide_on]
        if not passes:
            return []
        inputs = [{"prompt_token_ids": ids} for ids in passes]
        outputs = self.pooler.encode(inputs, pooling_params(), pooling_task="token_embed", use_tqdm=False)
        decisions = [
            states_verdict(self.gate, self.rows, out.outputs.data, len(ids), threshold)
            for ids, out in zip(passes, outputs)
        ]
        verdicts, start = [], 0
        for plan in plans:
            verdicts.append(most_unsafe(decisions[start : start + len(plan.decide_on)]))
            start += len(plan.decide_on)
        return verdicts

    def classify(self, prompts: Sequence[Prompt], threshold: float | None = None) -> list[GatedOutput]:
        """The verdict per prompt, nothing generated (one-pass: the safety token alone is generated)."""
        plans = [self.plan(p) for p in _as_list(prompts)]
        if not self.one_pass:
            return [GatedOutput(v, p, "", plan.ids) for plan, (v, p) in zip(plans, self.decide(plans, threshold))]
        from vllm import SamplingParams

        outputs = self.generate(prompts, SamplingParams(max_tokens=1, temperature=0.0), threshold)
        return [GatedOutput(out.verdict, out.p_unsafe, "", out.prompt_token_ids) for out in outputs]

    def one_pass_plan(self, plan: PromptPlan) -> bool:
        """Whether `plan` is decided in the generating engine (no assistant prefix) rather than by a pooling pass."""
        return self.one_pass and not plan.prefix and not plan.closed

    def generate(
        self, prompts: Sequence[Prompt], sampling_params: Any = None, threshold: float | None = None, **kwargs: Any
    ) -> list[GatedOutput]:
        """Decide each prompt's safety token and generate from it (`kwargs` go to `vllm.LLM.generate`)."""
        from vllm import SamplingParams

        plans = [self.plan(p) for p in _as_list(prompts)]
        threshold = check_threshold(threshold, "threshold")
        decided = threshold if threshold is not None else self.gate.threshold
        if not isinstance(sampling_params, Sequence):
            sampling_params = [sampling_params or SamplingParams()] * len(plans)
        if len(sampling_params) != len(plans):
            raise ValueError(f"{len(sampling_params)} sampling params for {len(plans)} prompts: give one or one each.")
        one = [self.one_pass_plan(plan) for plan in plans]
        two_pass = iter(self.decide([plan for plan, o in zip(plans, one) if not o], threshold))
        verdicts = [None if o else next(two_pass) for o in one]
        unsafe_prefix = self.gate.config.unsafe_prefix
        inputs = [
            {"prompt_token_ids": plan.ids if o else plan.generation_ids(v[0] == UNSAFE, unsafe_prefix)}
            for plan, o, v in zip(plans, one, verdicts)
        ]
        params = [one_pass_params(sp, decided) if o else sp for sp, o in zip(sampling_params, one)]
        kwargs.setdefault("use_tqdm", False)
        outputs = self.llm.generate(inputs, params, **kwargs)
        results = []
        for plan, o, verdict, sp, out in zip(plans, one, verdicts, sampling_params, outputs):
            if o:
                strip = SafetyTokenStrip(
                    self.safety_ids, (self.gate.safe_token, self.gate.unsafe_token), True, sp.logprobs is not None
                )
                strip(out)
                if strip.verdict is None:
                    raise UngatedOutput("vLLM returned no completion to read the verdict from")
                verdict = strip.verdict
            results.append(GatedOutput(*verdict, out.outputs[0].text if out.outputs else "", plan.ids, out))
        return results


def prompt_ids(tokenizer: Any, prompt: Prompt) -> list[int]:
    """The token ids of one prompt (text is tokenized with the tokenizer's special tokens, as vLLM does)."""
    if isinstance(prompt, Mapping):
        if "prompt_token_ids" in prompt:
            return [int(i) for i in prompt["prompt_token_ids"]]
        if "prompt" in prompt:
            return prompt_ids(tokenizer, prompt["prompt"])
        raise ValueError(f"a prompt dict needs `prompt` or `prompt_token_ids`, got keys {sorted(prompt)}.")
    if isinstance(prompt, str):
        return list(tokenizer(prompt)["input_ids"])
    if isinstance(prompt, torch.Tensor):
        return [int(i) for i in prompt.reshape(-1).tolist()]
    return [int(i) for i in prompt]


def _as_list(prompts: Sequence[Prompt] | Prompt) -> list[Prompt]:
    """A batch of prompts; one prompt (text, a dict, or one list of ids) becomes a batch of one."""
    if isinstance(prompts, (str, Mapping, torch.Tensor)):
        return [prompts]
    prompts = list(prompts)
    return [prompts] if prompts and isinstance(prompts[0], int) else prompts
