"""The gate inside vLLM's OpenAI-compatible server: verdicts for `/v1/chat/completions` and `/v1/completions`.

`install(state, decider, policy)` wraps the two handlers vLLM's `init_app_state` built (`state.openai_serving_chat`,
`state.openai_serving_completion`), as instance attributes (vLLM's classes are not patched):

- after vLLM renders a request to token ids, each prompt is checked (`serving.plan`);
- one-pass (the default of `safegate serve`): a prompt without an assistant prefix goes to the generating engine
  as it is; its model gates it in the prefill and starts the answer with the decided token (`serving.one_pass`),
  which `GatingEngineClient` (the handlers' `engine_client`) takes off the output with the verdict
  (`serving.forced_token`);
- two-pass (a prompt with an assistant prefix, beam search, structured outputs, a streamed completion of several
  prompts, or `safegate serve --two-pass`): its states come from the pooling engine, the gate decides, and the ids
  the generating engine receives become `prompt, decided safety token[, assistant prefix]`;
- the response gets one extra top-level field, `safegate`: `{"verdict": "safe"|"unsafe", "p_unsafe": float,
  "threshold": float|null}` for a chat completion, a list of those (one per prompt, in order) for a completion; a
  stream carries it on its first chunk.

Every other POST route answers 403 (`GatePlugin.attach_router`): nothing generates past the gate. A request is
refused with 400 when a prompt holds a safety token id or a safety token's string, when it sets fields
neither OpenAI's API nor vLLM define (other than `safegate`), or when `safegate` holds anything but a `threshold`
inside the operator's range (`ThresholdPolicy`).

Example:
    >>> policy = ThresholdPolicy(default=None, low=0.2, high=0.8)
    >>> policy.threshold({"safegate": {"threshold": 0.5}})
    0.5
    >>> policy.threshold({"safegate": {"threshold": 0.9}})
    Traceback (most recent call last):
    ...
    safegate.serving.online.BadRequest: `safegate.threshold` must be in [0.2, 0.8] on this server, got 0.9.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from safegate.hub.merged import MergedGate
from safegate.modeling.verdict import UNSAFE
from safegate.serving.decide import most_unsafe, pooling_params, states_verdict
from safegate.serving.forced_token import SafetyTokenStrip, one_pass_params
from safegate.serving.plan import PromptPlan, SafetyTokenInPrompt, plan_prompt

EXTENSION = "safegate"
_VERDICTS: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("safegate_verdicts", default=None)


class BadRequest(ValueError):
    """A request the gated server refuses with HTTP 400; the message names the field and the fix."""


@dataclass(frozen=True)
class ThresholdPolicy:
    """The p(unsafe) threshold a request decides with: `default` (the export's; `None` = argmax of the gated pair)
    unless it sets `safegate.threshold`, which must lie in `[low, high]`; `low = high = None`: no request may set one.
    """

    default: float | None
    low: float | None = None
    high: float | None = None

    def threshold(self, extra: Mapping[str, Any] | None) -> float | None:
        """The threshold for a request whose non-standard fields are `extra`; `BadRequest` when they are wrong."""
        extra = dict(extra or {})
        unknown = sorted(set(extra) - {EXTENSION})
        if unknown:
            raise BadRequest(
                f"unknown request field(s) {unknown}: a gated server accepts OpenAI's and vLLM's fields and "
                f"`{EXTENSION}` only."
            )
        options = extra.get(EXTENSION) or {}
        if not isinstance(options, Mapping) or set(options) - {"threshold"}:
            raise BadRequest(f"`{EXTENSION}` must be an object with the optional key `threshold`, got {options!r}.")
        value = options.get("threshold")
        if value is None:
            return self.default
        if self.low is None or self.high is None:
            raise BadRequest(
                f"`{EXTENSION}.threshold` is not accepted by this server (start it with --safety-threshold-range)."
            )
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not self.low <= value <= self.high:
            raise BadRequest(
                f"`{EXTENSION}.threshold` must be in [{self.low}, {self.high}] on this server, got {value!r}."
            )
        return float(value)


class GateDecider:
    """Decides prompts with a vLLM pooling engine (`AsyncLLM`, runner `pooling`) and the merged export's gate;
    `one_pass`: the generating engine decides prompts without an assistant prefix itself (`serving.one_pass`)."""

    def __init__(
        self, gate: MergedGate, rows: torch.Tensor, tokenizer: Any, markers: Any, pooler: Any, one_pass: bool = False
    ) -> None:
        self.gate, self.rows, self.tokenizer, self.markers, self.pooler = gate, rows, tokenizer, markers, pooler
        self.strings = (gate.safe_token, gate.unsafe_token)
        self.one_pass = one_pass

    def check_text(self, request: Any) -> None:
        """`BadRequest` when the request's messages or prompt spell a safety token."""
        fields = request.model_dump(include={"messages", "prompt"}, mode="json")
        text = json.dumps(fields, ensure_ascii=False)
        found = [s for s in self.strings if s in text]
        if found:
            raise BadRequest(f"the prompt contains the safety token string(s) {found}; remove them.")

    async def states(self, ids: list[int]) -> torch.Tensor:
        """The final-norm states of `ids` from the pooling engine."""
        from vllm.inputs.engine import tokens_input

        final = None
        async for out in self.pooler.encode(tokens_input(ids), pooling_params(), f"safegate-{uuid.uuid4()}"):
            final = out
        if final is None:
            raise RuntimeError("the pooling engine returned nothing")
        return final.outputs.data

    def plan(self, engine_input: dict[str, Any]) -> PromptPlan:
        """The plan of one rendered prompt; `BadRequest` for media inputs and safety token ids."""
        if engine_input.get("type", "token") != "token" or "prompt_token_ids" not in engine_input:
            raise BadRequest("a gated server serves text prompts only (no embeddings or media inputs).")
        try:
            return plan_prompt(engine_input["prompt_token_ids"], self.safety_ids, self.markers, self.tokenizer)
        except SafetyTokenInPrompt as err:
            raise BadRequest(str(err)) from err

    async def decide_two_pass(self, plan: PromptPlan, engine_input: dict[str, Any], threshold: float | None) -> dict:
        """Decide `plan` with the pooling engine, rewrite the input's ids to the generation ids; the verdict record."""
        states = await asyncio.gather(*(self.states(ids) for ids in plan.decide_on))
        decisions = [states_verdict(self.gate, self.rows, st, len(ids), threshold)
                     for st, ids in zip(states, plan.decide_on)]  # fmt: skip
        label, p = most_unsafe(decisions)
        set_ids(engine_input, plan.generation_ids(label == UNSAFE, self.gate.config.unsafe_prefix))
        return {"verdict": label, "p_unsafe": p, "threshold": threshold}

    async def gate_inputs(
        self, engine_inputs: Sequence[dict[str, Any]], threshold: float | None, one_pass: bool = False
    ) -> list[dict | None]:
        """Check each rendered prompt; decide the two-pass ones and rewrite their ids in place. The verdict records,
        `None` for a prompt left to the generating engine's one-pass gate (`one_pass` and no assistant prefix)."""
        plans = [self.plan(engine_input) for engine_input in engine_inputs]
        records: list[dict | None] = []
        for plan, engine_input in zip(plans, engine_inputs):
            if one_pass and not plan.prefix and not plan.closed:
                if plan.ids != list(engine_input["prompt_token_ids"]):
                    set_ids(engine_input, plan.ids)
                records.append(None)
            else:
                records.append(await self.decide_two_pass(plan, engine_input, threshold))
        return records

    @property
    def safety_ids(self) -> tuple[int, int]:
        return self.gate.safe_id, self.gate.unsafe_id


def set_ids(engine_input: dict[str, Any], ids: list[int]) -> None:
    """Give a rendered prompt new token ids (its text and offsets no longer match them: dropped)."""
    engine_input["prompt_token_ids"] = ids
    for stale in ("prompt", "prompt_token_offsets"):
        engine_input.pop(stale, None)


class GatingEngineClient:
    """The engine client of a gated handler: `generate` on a prompt left to the one-pass gate asks the engine for the
    safety token first (`forced_token.one_pass_params`), takes it off every output (`SafetyTokenStrip`) and writes
    the verdict into the request's record; a prompt with structured outputs is decided two-pass first. Prompts
    already decided (their ids hold a safety token) pass through. Everything else is the wrapped client's."""

    def __init__(self, client: Any, decider: GateDecider, default_threshold: float | None) -> None:
        self._client, self._decider, self._default = client, decider, default_threshold

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def generate(self, prompt: Any, sampling_params: Any, request_id: str, *args: Any, **kwargs: Any) -> Any:
        holder = _VERDICTS.get()  # now: the generator's body runs later, outside the handler's context
        slot = None
        if holder is not None:
            slot = holder.setdefault("next", 0)
            holder["next"] = slot + 1
        return self._generate(holder, slot, prompt, sampling_params, request_id, *args, **kwargs)

    async def _generate(self, holder: dict | None, slot: int | None, prompt: Any, sampling_params: Any,
                        request_id: str, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:  # fmt: skip
        from vllm.sampling_params import RequestOutputKind

        ids = prompt.get("prompt_token_ids") if isinstance(prompt, dict) else None
        decider = self._decider
        threshold = holder.get("threshold", self._default) if holder is not None else self._default
        records = holder.get("records") if holder is not None else None
        if ids is None or any(i in decider.safety_ids for i in ids):  # decided already (or not a token prompt)
            async for out in self._client.generate(prompt, sampling_params, request_id, *args, **kwargs):
                yield out
            return
        if getattr(sampling_params, "structured_outputs", None) is not None:  # the grammar must not see the token
            record = await decider.decide_two_pass(decider.plan(prompt), prompt, threshold)
            if records is not None and slot is not None and slot < len(records):
                records[slot] = record
            async for out in self._client.generate(prompt, sampling_params, request_id, *args, **kwargs):
                yield out
            return
        strip = SafetyTokenStrip(
            decider.safety_ids, decider.strings, sampling_params.output_kind != RequestOutputKind.DELTA,
            sampling_params.logprobs is not None,
        )  # fmt: skip
        params = one_pass_params(sampling_params, threshold)
        async for out in self._client.generate(prompt, params, request_id, *args, **kwargs):
            had_verdict = strip.verdict is not None
            strip(out)
            if strip.verdict is not None and not had_verdict and records is not None and slot is not None:
                label, p = strip.verdict
                if slot < len(records):
                    records[slot] = {"verdict": label, "p_unsafe": p, "threshold": threshold}
            if any(len(c.token_ids) or c.finish_reason is not None for c in out.outputs) or out.finished:
                yield out  # an output that held the safety token alone is not passed on


def install(state: Any, decider: GateDecider, policy: ThresholdPolicy) -> None:
    """Wrap the chat and completion handlers on vLLM's app `state` (see the module docstring)."""
    chat = getattr(state, "openai_serving_chat", None)
    if chat is not None:
        _wrap(chat, "render_chat_request", "create_chat_completion", decider, policy, single=True)
    completion = getattr(state, "openai_serving_completion", None)
    if completion is not None:
        _wrap(completion, "render_completion_request", "create_completion", decider, policy, single=False)


def _wrap(handler: Any, render_name: str, create_name: str, decider: GateDecider, policy: ThresholdPolicy,
          single: bool) -> None:  # fmt: skip
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse

    render, create = getattr(handler, render_name), getattr(handler, create_name)
    if decider.one_pass:
        handler.engine_client = GatingEngineClient(handler.engine_client, decider, policy.default)

    async def gated_render(request: Any) -> Any:  # every caller gets gated ids (fail closed), only ours the record
        result = await render(request)
        if isinstance(result, ErrorResponse):
            return result
        engine_inputs = result[1] if single else result
        one_pass = decider.one_pass and not getattr(request, "use_beam_search", False)
        one_pass = one_pass and (single or len(engine_inputs) == 1 or not getattr(request, "stream", False))
        try:
            threshold = policy.threshold(request.model_extra)
            decider.check_text(request)
            records = await decider.gate_inputs(engine_inputs, threshold, one_pass)
        except BadRequest as err:
            return handler.create_error_response(str(err), param=EXTENSION)
        holder = _VERDICTS.get()
        if holder is not None:
            holder.update(records=records, threshold=threshold, next=0)
        return result

    async def gated_create(request: Any, raw_request: Any = None) -> Any:
        holder: dict[str, Any] = {}
        token = _VERDICTS.set(holder)
        try:
            out = await create(request, raw_request)
        finally:
            _VERDICTS.reset(token)
        if "records" not in holder or isinstance(out, ErrorResponse):
            return out

        def field() -> Any:  # one-pass records are filled as generation starts: read them when sent
            records = holder["records"]
            if any(record is None for record in records):
                raise RuntimeError("a prompt's verdict is missing: the gate did not run for it")
            return records[0] if single else records

        if hasattr(out, "model_dump"):
            setattr(out, EXTENSION, field())
            return out
        return _first_chunk_with(out, field)

    setattr(handler, render_name, gated_render)
    setattr(handler, create_name, gated_create)


async def _first_chunk_with(stream: AsyncIterator[str], field: Callable[[], Any]) -> AsyncIterator[str]:
    """The SSE stream with `field()` added to its first data chunk."""
    pending = True
    async for chunk in stream:
        if pending and chunk.startswith("data: {"):
            body = json.loads(chunk[len("data: ") :])
            body[EXTENSION] = field()
            chunk = f"data: {json.dumps(body)}\n\n"
            pending = False
        yield chunk


#: The POST routes a gated server answers: the two gated ones, and tokenization (it generates nothing).
OPEN_POST_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"})
#: Environment variables `safegate serve` sets for the plugin (vLLM's own parser owns the command line).
RANGE_ENV = "SAFEGATE_THRESHOLD_RANGE"
POOLING_MEMORY_ENV = "SAFEGATE_POOLING_GPU_MEMORY"


class GatePlugin:
    """vLLM endpoint plugin (`vllm.endpoint_plugins` entry point `safegate`, loaded only when `VLLM_PLUGINS` names
    it, as `safegate serve` does): adds no route; after vLLM built its handlers it starts the pooling engine on the
    same merged export and `install`s the gate on the chat and completion handlers."""

    name = "safegate"
    required_tasks = ("generate",)

    def attach_router(self, app: Any) -> None:
        """No routes of its own: the gate rides on vLLM's `/v1/chat/completions` and `/v1/completions`. Every other
        POST route (the Responses, Anthropic and Cohere APIs, token-level generation, batch, admin) answers 403, so
        that nothing generates past the gate."""
        from starlette.responses import JSONResponse

        @app.middleware("http")
        async def only_gated_generation(request: Any, call_next: Any) -> Any:
            if request.method == "POST" and request.url.path not in OPEN_POST_PATHS:
                message = (
                    f"{request.url.path} is not served by a gated server: use /v1/chat/completions or /v1/completions."
                )
                return JSONResponse({"error": {"message": message, "type": "Forbidden", "code": 403}}, status_code=403)
            return await call_next(request)

    async def init_state(self, engine_client: Any, state: Any, args: Any) -> None:
        """Build the decider for the served export (`args.model`) and wrap the handlers."""
        import dataclasses
        import os

        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from safegate.hub.merged import read_merged_gate
        from safegate.modeling.turns import chat_markers
        from safegate.serving.checkpoint import check_engine_loadable, safety_head_rows
        from safegate.serving.decide import POOLER_CONFIG
        from safegate.serving.one_pass import ARCH_PREFIX
        from safegate.serving.tap import EXTENSION_CLASS, INSTALL_METHOD

        if engine_client is None:
            raise RuntimeError("safegate's gate needs an engine; it cannot run on vLLM's render-only server")
        folder = args.model
        gate = read_merged_gate(folder)
        check_engine_loadable(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        engine_args = AsyncEngineArgs.from_cli_args(args)
        inner = gate.tapped_layer != -1  # the pooling pass returns that layer beside the final states (serving.tap)
        if inner and engine_args.worker_extension_cls:
            raise ValueError(f"--worker-extension-cls cannot be combined with a gate on layer {gate.tapped_layer}.")
        overrides = engine_args.hf_overrides
        architectures = overrides.get("architectures") if isinstance(overrides, dict) else None
        one_pass = any(str(a).startswith(ARCH_PREFIX) for a in architectures or [])
        if one_pass:  # the pooling engine runs the plain model
            overrides = {k: v for k, v in overrides.items() if k != "architectures"}
        engine_args = dataclasses.replace(
            engine_args,
            hf_overrides=overrides,
            logits_processors=None if one_pass else engine_args.logits_processors,
            runner="pooling",
            pooler_config=dict(POOLER_CONFIG),
            gpu_memory_utilization=float(os.environ.get(POOLING_MEMORY_ENV, engine_args.gpu_memory_utilization)),
            worker_extension_cls=EXTENSION_CLASS if inner else engine_args.worker_extension_cls,
        )
        pooler = AsyncLLM.from_engine_args(engine_args)
        if inner:
            await pooler.collective_rpc(INSTALL_METHOD, args=(gate.tapped_layer,))
        decider = GateDecider(gate, safety_head_rows(folder), tokenizer, chat_markers(tokenizer), pooler, one_pass)
        low, high = parse_range(os.environ.get(RANGE_ENV))
        install(state, decider, ThresholdPolicy(gate.threshold, low, high))
        state.safegate_pooler = pooler


def parse_range(text: str | None) -> tuple[float | None, float | None]:
    """`"LOW,HIGH"` (each in [0, 1], LOW <= HIGH) as floats; `None`/empty: `(None, None)` (no request threshold).

    Example:
        >>> parse_range("0.2,0.8"), parse_range(None)
        ((0.2, 0.8), (None, None))
    """
    if not text:
        return None, None
    try:
        low, high = (float(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"the threshold range must be 'LOW,HIGH' (two numbers), got {text!r}.") from None
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"the threshold range must satisfy 0 <= LOW <= HIGH <= 1, got {text!r}.")
    return low, high
