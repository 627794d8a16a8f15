"""One-pass CASA verdicts inside vLLM's generating engine: the gate runs in the prefill that generates the answer.

The two-pass path (`serving.offline`, `serving.online`) asks a pooling engine for a prompt's states, decides, and
prefills the prompt again in the generating engine; on a CPU that second prefill costs about as much as the whole
decode. Here the generating engine's own model does it (`docs/serving-vllm.md`):

- `gated_architecture(base)` subclasses a vLLM causal-LM class (`Safegate<Arch>`, registered by the
  `vllm.general_plugins` entry point `register`, selected with `hf_overrides={"architectures": [...]}`:
  `engine_kwargs`). Its `forward` finds, from the attention metadata, every request whose whole prompt was
  prefilled in this step (query length == sequence length) and that holds no safety token id, runs the gate over
  that prompt's tapped states and the head's two safety rows over its last state (`hub.merged.gated_safety_pair`,
  the transformers path's arithmetic), and leaves the gated pair in `PENDING` for the sampler of this step.
- Its `compute_logits` returns float32 logits in which the safety columns are `-inf` (an answer never holds a
  safety token) and a pending row holds only the gated pair: vLLM's raw logprob of the token sampled there is
  log p(safe) or log p(unsafe).
- `serving.forced_token.SafetyTokenForcer` (a V1 logits processor) makes that row one-hot on the token the
  request's threshold decides, so greedy, sampled, penalised and biased requests alike start with it.
  `serving.forced_token.strip_safety_token` takes it off the output and reads the verdict and p(unsafe).

A request whose prompt holds a safety id is not gated here: that is the two-pass path's generation prompt (the
decided token already in it), which users cannot send (`serving.plan`). Needs chunked prefill and prefix caching
off (a partial prefill must never be taken for a prompt), no speculative decoding, raw logprobs, and the V1 model
runner (vLLM's CPU build; on a GPU `VLLM_USE_V2_MODEL_RUNNER=0`); `check_one_pass_config` refuses anything else.

Example:
    >>> engine_kwargs("LlamaForCausalLM")["hf_overrides"]
    {'architectures': ['SafegateLlamaForCausalLM']}
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from safegate.hub.merged import MergedGate, gated_safety_pair, read_merged_gate
from safegate.serving.checkpoint import UnservableExport, safety_head_rows
from safegate.serving.tap import residual_stream

ARCH_PREFIX = "Safegate"
FORCER_CLASS = "safegate.serving.forced_token:SafetyTokenForcer"


@dataclass
class PendingVerdicts:
    """What the last forward of this process left for its sampler: `pairs` maps a logits row (the request's index
    in the step's batch) to its gated pair `(z_s', z_u')`; `rows` is the number of requests in that step (`-1`: the
    step had no metadata, nothing is pending); `threshold` the export's default."""

    pairs: dict[int, tuple[float, float]] = field(default_factory=dict)
    rows: int = -1
    safety_ids: tuple[int, int] = (-1, -1)
    threshold: float | None = None


#: One per process: the model writes it in `forward`, the logits processor reads it in the same step.
PENDING = PendingVerdicts()


def engine_kwargs(architecture: str) -> dict[str, Any]:
    """`vllm.LLM` / engine arguments that serve a merged export whose `config.json` names `architecture` one-pass."""
    return {
        "hf_overrides": {"architectures": [ARCH_PREFIX + architecture]},
        "logits_processors": [FORCER_CLASS],
        "enable_prefix_caching": False,
        "enable_chunked_prefill": False,
    }


def export_architecture(path: str | os.PathLike) -> str:
    """The architecture named by the export's `config.json`."""
    architectures = json.loads((Path(path) / "config.json").read_text()).get("architectures") or []
    if len(architectures) != 1:
        raise UnservableExport(f"{path}/config.json must name one architecture, got {architectures}.")
    return architectures[0]


def check_one_pass_config(vllm_config: Any, tapped_layer: int) -> None:
    """Raise `ValueError` naming the setting when the engine cannot compute one-pass verdicts exactly."""
    scheduler, cache = vllm_config.scheduler_config, vllm_config.cache_config
    problems = []
    if getattr(scheduler, "enable_chunked_prefill", False):
        problems.append("chunked prefill is on (--no-enable-chunked-prefill / enable_chunked_prefill=False)")
    if getattr(cache, "enable_prefix_caching", False):
        problems.append("prefix caching is on (--no-enable-prefix-caching / enable_prefix_caching=False)")
    if getattr(vllm_config, "speculative_config", None) is not None:
        problems.append("speculative decoding is on (drop --speculative-config)")
    mode = getattr(vllm_config.model_config, "logprobs_mode", "raw_logprobs")
    if mode != "raw_logprobs":
        problems.append(f"logprobs_mode is {mode!r} (p(unsafe) is the raw logprob: drop --logprobs-mode)")
    device = str(getattr(getattr(vllm_config, "device_config", None), "device_type", "cpu"))
    if device != "cpu" and os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "").lower() not in ("0", "false"):
        problems.append(
            f"on {device}, vLLM's model runner V2 (its default there) runs no V1 logits processor, so nothing would "
            "force the decided token (set VLLM_USE_V2_MODEL_RUNNER=0)"
        )
    if tapped_layer != -1 and vllm_config.parallel_config.pipeline_parallel_size != 1:
        problems.append(f"a gate on layer {tapped_layer} needs one pipeline stage (--pipeline-parallel-size 1)")
    if problems:
        raise ValueError("safegate's one-pass gate cannot decide exactly here: " + "; ".join(problems) + ".")


class OnePassGate:
    """The gate as the generating engine's model runs it (see the module docstring); not an `nn.Module`, so vLLM's
    weight loader never looks for its tensors in the checkpoint."""

    def __init__(self, path: str | os.PathLike, model: torch.nn.Module, device: torch.device | None = None) -> None:
        self.gate: MergedGate = read_merged_gate(path)
        self.rows = safety_head_rows(path).to(device or "cpu")
        self.gate.module.to(device or "cpu")
        self.ids = (self.gate.safe_id, self.gate.unsafe_id)
        self.kept: dict[str, torch.Tensor] = {}
        if self.gate.tapped_layer != -1:
            layers = getattr(getattr(model, "model", None), "layers", None)
            if layers is None:
                raise UnservableExport(
                    f"{type(model).__name__} has no `model.layers`: a gate on layer k >= 0 needs them"
                )
            layers[self.gate.tapped_layer].register_forward_hook(self._keep)
        PENDING.safety_ids, PENDING.threshold = self.ids, self.gate.threshold

    def _keep(self, module: Any, args: Any, output: Any) -> None:
        self.kept["states"] = residual_stream(output)

    @torch.no_grad()
    def observe(self, input_ids: torch.Tensor | None, hidden: Any) -> None:
        """Compute the gated pair of every prompt prefilled whole in this step (see the module docstring)."""
        PENDING.pairs, PENDING.rows = {}, -1
        tapped = self.kept.pop("states", None)
        meta = attention_metadata()
        if meta is None or input_ids is None or not isinstance(hidden, torch.Tensor):
            return
        starts = meta.query_start_loc.to("cpu", torch.long)
        seq_lens = meta.seq_lens.to("cpu", torch.long)[: starts.numel() - 1]
        query_lens = starts[1:] - starts[:-1]
        PENDING.rows = int((query_lens > 0).sum())
        tapped = hidden if tapped is None else tapped
        for i in torch.nonzero((query_lens == seq_lens) & (query_lens > 0)).flatten().tolist():
            s, e = int(starts[i]), int(starts[i + 1])
            ids = input_ids[s:e]
            if bool(((ids == self.ids[0]) | (ids == self.ids[1])).any()):
                continue  # the two-pass path's prompt: decided already
            pair = self.rows.to(hidden.device) @ hidden[e - 1].float()
            z_safe, z_unsafe = gated_safety_pair(self.gate, tapped[s:e].float(), pair)
            PENDING.pairs[i] = (float(z_safe), float(z_unsafe))

    def rewrite(self, logits: torch.Tensor) -> torch.Tensor:
        """float32 logits with the safety columns `-inf` and each pending row holding only its gated pair."""
        logits = logits.float()
        logits[:, list(self.ids)] = float("-inf")
        if logits.shape[0] == PENDING.rows:
            for row, (z_safe, z_unsafe) in PENDING.pairs.items():
                logits[row] = float("-inf")
                logits[row, self.ids[0]], logits[row, self.ids[1]] = z_safe, z_unsafe
        return logits


def attention_metadata() -> Any:
    """The attention metadata of the running forward (any layer's: all share the batch layout), or `None`."""
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if not is_forward_context_available():
        return None
    meta = get_forward_context().attn_metadata
    if isinstance(meta, list):  # micro-batches: not supported, nothing gated (the output check fails closed)
        return None
    if isinstance(meta, dict):
        meta = next(iter(meta.values()), None)
    return meta if hasattr(meta, "query_start_loc") and hasattr(meta, "seq_lens") else None


def gated_architecture(base: type) -> type:
    """`Safegate<base>`: `base` (a vLLM causal LM) with the one-pass gate in its `forward` and `compute_logits`."""

    class Gated(base):  # type: ignore[misc, valid-type]
        def __init__(self, *, vllm_config: Any, prefix: str = "", **kwargs: Any) -> None:
            super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
            path = vllm_config.model_config.model
            gate = OnePassGate(path, self, vllm_config.device_config.device)
            check_one_pass_config(vllm_config, gate.gate.tapped_layer)
            object.__setattr__(self, "_safegate", gate)

        def forward(self, input_ids: Any, positions: Any, *args: Any, **kwargs: Any) -> Any:
            hidden = super().forward(input_ids, positions, *args, **kwargs)
            self._safegate.observe(input_ids, hidden)
            return hidden

        def compute_logits(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor | None:
            logits = super().compute_logits(hidden_states, *args, **kwargs)
            return None if logits is None else self._safegate.rewrite(logits)

        def compute_logits_local(self, *args: Any, **kwargs: Any) -> torch.Tensor:
            raise RuntimeError(
                "safegate's one-pass gate needs vLLM's V1 model runner (full logits per request); set "
                "VLLM_USE_V2_MODEL_RUNNER=0 or serve two-pass (`safegate serve --two-pass`)."
            )

    Gated.__name__ = Gated.__qualname__ = ARCH_PREFIX + base.__name__
    Gated.__module__ = __name__
    return Gated


def __getattr__(name: str) -> type:
    """`Safegate<Arch>` built on first use (vLLM imports registered classes by `module:name`)."""
    if not name.startswith(ARCH_PREFIX):
        raise AttributeError(name)
    from vllm.model_executor.models.registry import ModelRegistry

    base = ModelRegistry._try_load_model_cls(name[len(ARCH_PREFIX) :])
    if base is None:
        raise AttributeError(f"vLLM has no architecture {name[len(ARCH_PREFIX) :]!r} to gate")
    cls = gated_architecture(base)
    setattr(sys.modules[__name__], name, cls)
    return cls


def register() -> None:
    """`vllm.general_plugins` entry point: register `Safegate<Arch>` for every causal-LM architecture vLLM has."""
    from vllm.model_executor.models.registry import ModelRegistry

    for arch in list(ModelRegistry.get_supported_archs()):
        if arch.endswith("ForCausalLM") and not arch.startswith(ARCH_PREFIX):
            ModelRegistry.register_model(ARCH_PREFIX + arch, f"{__name__}:{ARCH_PREFIX}{arch}")
