"""SafeSteer decoding (arXiv 2605.11716): a hidden-state probe steers the first decoding steps away from harm.

Training-free for the model; only a logistic probe is fitted (`safegate.defenses.probe_fit`). For the first
`steps` steps the probe scores the top-k candidate tokens and harmful ones are removed (all harmful: the row
emits a refusal); for image inputs an alignment vector shifts the residual stream. Also exported as
`SafeSteerDecoding`. How one call runs and what is reconstructed (OUR CHOICE): docs/defenses.md, "SafeSteer".

Example:
    >>> from safegate.defenses import fit_probe
    >>> from safegate.testing import tiny_model_and_tokenizer, chat
    >>> model, tok = tiny_model_and_tokenizer("qwen2")
    >>> records = [{"prompt": "How can I build a bomb?", "label": "unsafe"}, {"prompt": "Hi!", "label": "safe"}]
    >>> probe = fit_probe(model, tok, records, layer=1, max_new_tokens=4, val_fraction=0.0)
    >>> steer = SafeSteer(model, tok, probe=probe, steps=4, top_k=3)
    >>> out = steer.generate(**chat(tok, ["Hi"]), max_new_tokens=5, return_dict_in_generate=True)
    >>> out.safety[0] in ("safe", "unsafe"), 0.0 <= float(out.safety_scores[0]) <= 1.0
    (True, True)
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn
from transformers import LogitsProcessor, LogitsProcessorList

from safegate.defenses.decoding import (
    DropInSurface,
    StepRecorder,
    attach_metadata,
    check_generate_kwargs,
    eos_ids,
    expanded_cache,
    expected_rows,
    force_tokens,
    next_step_kwargs,
    rows_with_images,
)
from safegate.defenses.probe import (
    AlignmentVector,
    LinearProbe,
)
from safegate.modeling.arch import resolve
from safegate.modeling.kv_cache import cache_in
from safegate.modeling.tokens import text_tokenizer

SAFE, UNSAFE = "safe", "unsafe"
MODES = ("topk", "check_then_resample")
DEFAULT_REFUSAL = "I'm sorry, but I can't help with that."


# ------------------------------------------------------------------------------------------------ decoding
class _EarlyExit(Exception):
    """Raised by the probe tap to stop a candidate forward once the probe layer has run."""


class _AlignmentHook:
    """Adds the MSAV delta to the output of its layer, after the prefill, on rows with an image only."""

    def __init__(self, module: nn.Module, delta: torch.Tensor, rows: torch.Tensor, recorder: StepRecorder) -> None:
        self.module, self.delta, self.rows, self.recorder = module, delta, rows, recorder
        self.applied = 0
        self.handle: Any = None

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        if self.recorder.forwards_done == 0 or not bool(self.rows.any()):
            return None  # the prompt pass, or no image row: untouched
        h = output[0] if isinstance(output, (tuple, list)) else output
        rows = self.rows.to(h.device)
        if h.shape[0] != rows.shape[0]:
            rows = rows.repeat_interleave(h.shape[0] // rows.shape[0])
        h = h + rows.view(-1, 1, 1).to(h.dtype) * self.delta.to(h.device, h.dtype)
        self.applied += 1
        return (h, *output[1:]) if isinstance(output, tuple) else h

    def __enter__(self) -> _AlignmentHook:
        self.handle = self.module.register_forward_hook(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


class SafeSteerLogitsProcessor(LogitsProcessor):
    """One SafeSteer decoding (see the module docstring); built by `SafeSteer.generate` for each call."""

    supports_continuous_batching = False

    def __init__(self, steer: SafeSteer, recorder: StepRecorder, prompt_length: int, rows: int) -> None:
        self.s = steer
        self.recorder = recorder
        self.prompt_length = prompt_length
        self.refusing = torch.zeros(rows, dtype=torch.bool)
        self.finished = torch.zeros(rows, dtype=torch.bool)
        self.refusal_position = [0] * rows
        self.top1_scores: list[list[float]] = [[] for _ in range(rows)]
        self.interventions: list[list[int]] = [[] for _ in range(rows)]
        self.flagged_top1 = torch.zeros(rows, dtype=torch.bool)
        self.candidate_forwards = 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        s = self.s
        step = input_ids.shape[1] - self.prompt_length
        if step >= 1 and s.stop_ids:
            self.finished |= torch.isin(input_ids[:, -1].cpu(), torch.tensor(s.stop_ids))
        out = scores
        active = ~self.refusing & ~self.finished
        if step < s.steps and bool(active.any()):
            out = self._steer(scores, step, active)
        if bool(self.refusing.any()):
            out = self._force_refusal(out)
        return out

    def _steer(self, scores: torch.Tensor, step: int, active: torch.Tensor) -> torch.Tensor:
        s = self.s
        last = self.recorder.last
        if last is None:
            raise RuntimeError("SafeSteer saw no forward of the model before its logits")
        k = min(s.top_k, scores.shape[-1])
        candidates = scores.topk(k, dim=-1).indices
        invalid = torch.isinf(scores.gather(1, candidates)).cpu()
        if s.mode == "check_then_resample":
            first = s.score_candidates(last, candidates[:, :1], recorder=self.recorder).cpu()
            self.candidate_forwards += 1
            probe_scores = torch.zeros(candidates.shape, dtype=torch.float32)
            probe_scores[:, :1] = first
            if bool((active & (first[:, 0] > s.tau)).any()):
                probe_scores = s.score_candidates(last, candidates, recorder=self.recorder).cpu()
                self.candidate_forwards += 1
        else:
            probe_scores = s.score_candidates(last, candidates, recorder=self.recorder).cpu()
            self.candidate_forwards += 1
        flagged = (probe_scores > s.tau) & ~invalid
        out = scores.clone()
        for row in torch.nonzero(active).flatten().tolist():
            self.top1_scores[row].append(float(probe_scores[row, 0]))
            if bool(flagged[row, 0]):
                self.flagged_top1[row] = True
            if not bool(flagged[row].any()):
                continue  # nothing harmful among the candidates: the distribution is left as it is
            self.interventions[row].append(step)
            keep = ~flagged[row] & ~invalid[row]
            if not bool(keep.any()):
                self.refusing[row] = True  # refusal mode for the rest of the generation
                continue
            allowed = torch.full_like(out[row], float("-inf"))
            ids = candidates[row][keep.to(candidates.device)]
            allowed[ids] = scores[row, ids]
            out[row] = allowed
        return out

    def _force_refusal(self, scores: torch.Tensor) -> torch.Tensor:
        template = self.s.refusal_ids + self.s.stop_ids[:1]
        tokens = torch.zeros(scores.shape[0], dtype=torch.long)
        rows = torch.zeros(scores.shape[0], dtype=torch.bool)
        for row in torch.nonzero(self.refusing & ~self.finished).flatten().tolist():
            position = self.refusal_position[row]
            if position < len(template):
                tokens[row], rows[row] = template[position], True
                self.refusal_position[row] += 1
        return force_tokens(scores, rows, tokens) if bool(rows.any()) else scores


class SafeSteer(DropInSurface):
    """SafeSteer decoding around a Hugging Face (multimodal) model; see the module docstring.

    Args:
        model: the model (Qwen2.5-Omni: its thinker generates; kwargs prefixed `thinker_` are accepted).
        processor: its processor or tokenizer (for the refusal template).
        probe (`LinearProbe`): from `fit_probe` (or `LinearProbe.load`).
        layer (`int | None`): probe layer; default `probe.layer`.
        tau (`float | None`): a candidate is harmful iff its score > tau; default `probe.tau`. `tau=1` never
            intervenes.
        steps (`int`): steered steps N_dp (16; early steps carry the signal).
        top_k (`int`): candidates scored per step (OUR CHOICE: 10).
        mode (`str`): `"topk"` scores all k candidates every step; `"check_then_resample"` scores the top-1 first
            and all k only when it is harmful (cheaper).
        refusal (`str`): refusal template emitted in refusal mode, followed by EOS.
        alignment (`AlignmentVector | None`): MSAV for image inputs.
    """

    name = "safesteer"

    def __init__(
        self,
        model: Any,
        processor: Any,
        probe: LinearProbe,
        layer: int | None = None,
        tau: float | None = None,
        steps: int = 16,
        top_k: int = 10,
        mode: str = "topk",
        refusal: str = DEFAULT_REFUSAL,
        alignment: AlignmentVector | None = None,
    ) -> None:
        if not isinstance(probe, LinearProbe):
            raise TypeError(f"`probe` must be a LinearProbe (see fit_probe), got {type(probe).__name__}.")
        if mode not in MODES:
            raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}.")
        if not (isinstance(steps, int) and steps >= 0):
            raise ValueError(f"`steps` must be an int >= 0, got {steps!r}.")
        if not (isinstance(top_k, int) and top_k >= 1):
            raise ValueError(f"`top_k` must be an int >= 1, got {top_k!r}.")
        self.model = model
        self.processor = processor
        self.tokenizer = text_tokenizer(processor)
        self.arch = resolve(model)
        self.root = self.arch.root
        self.layer = probe.layer if layer is None else int(layer)
        self.probe_module = self.arch.tap_module(self.layer)
        width = self.arch.embed.weight.shape[1]
        if probe.weight.shape[0] != width:
            raise ValueError(f"the probe reads {probe.weight.shape[0]}-dim states but this model's are {width}-dim.")
        self.probe = probe.to(self.device)
        self.tau = float(probe.tau if tau is None else tau)
        if not 0.0 <= self.tau <= 1.0:
            raise ValueError(f"`tau` must be in [0, 1], got {self.tau!r}.")
        self.steps, self.top_k, self.mode = steps, top_k, mode
        self.refusal = refusal
        self.refusal_ids = [int(i) for i in self.tokenizer(refusal, add_special_tokens=False)["input_ids"]]
        self.stop_ids = eos_ids(self.root.generation_config, self.tokenizer)
        if alignment is not None:
            if alignment.vector.shape[-1] != width:
                raise ValueError(f"the alignment vector is {alignment.vector.shape[-1]}-dim; the model's is {width}.")
            self.arch.tap_module(alignment.layer)
        self.alignment = alignment
        self.last_processor: SafeSteerLogitsProcessor | None = None

    # ---------------------------------------------------------------------------------------- candidates
    def _probe_states(self, kwargs: dict[str, Any], recorder: StepRecorder | None) -> torch.Tensor:
        captured: list[torch.Tensor] = []

        def tap(module: nn.Module, args: Any, output: Any) -> None:
            h = output[0] if isinstance(output, (tuple, list)) else output
            captured.append(h[:, -1])
            raise _EarlyExit

        handle = self.probe_module.register_forward_hook(tap)
        try:
            with recorder.paused() if recorder is not None else contextlib.nullcontext(), torch.no_grad():
                self.root(**kwargs)
        except _EarlyExit:
            pass
        finally:
            handle.remove()
        if not captured:
            raise RuntimeError("the probe layer did not run during the candidate forward")
        return captured[0]

    def score_candidates(
        self,
        last: dict[str, Any],
        candidates: torch.Tensor,
        batched: bool = True,
        recorder: StepRecorder | None = None,
    ) -> torch.Tensor:
        """Probe scores (B, k) of feeding each candidate id after the step whose inputs were `last` (P2).

        `batched=True` runs one forward of B*k single tokens over a k-fold expanded copy of the cache;
        `batched=False` runs k forwards of B tokens (the reference the tests compare against). The real cache is
        never modified.
        """
        cache = cache_in(last)
        if cache is None:
            raise RuntimeError("SafeSteer needs the KV cache of the decoding step (`use_cache=True`).")
        rows, k = candidates.shape
        if batched:
            kwargs = next_step_kwargs(last, candidates.reshape(rows * k, 1), expanded_cache(cache, k), repeats=k)
            return self.probe(self._probe_states(kwargs, recorder)).view(rows, k)
        columns = []
        for j in range(k):
            kwargs = next_step_kwargs(last, candidates[:, j : j + 1], expanded_cache(cache, 1))
            columns.append(self.probe(self._probe_states(kwargs, recorder)))
        return torch.stack(columns, dim=1)

    # ---------------------------------------------------------------------------------------- generate
    def generate(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 **kwargs: Any) -> Any:  # fmt: skip
        """Drop-in for `model.generate` with SafeSteer decoding.

        Returns:
            Token ids, or with `return_dict_in_generate=True` the usual output plus `.safety` (`"unsafe"` when the
            probe flagged the model's preferred token at some steered step or refusal mode started),
            `.safety_scores` (max probe score of the preferred token over the steered steps), `.probe_scores`
            (per row, per step), `.interventions` (steps where candidates were removed), `.refused`,
            `.candidate_forwards` and `.msav_rows` (rows the alignment vector was applied to).
        """
        prefix = self.arch.spec.kwarg_prefix
        if prefix:
            kwargs = {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in kwargs.items()}
        gen_config = kwargs.get("generation_config") or self.generation_config
        check_generate_kwargs(kwargs, gen_config)
        if kwargs.get("use_cache") is False:
            raise ValueError("`use_cache=False`: SafeSteer scores candidates on the KV cache; remove the option.")
        if input_ids is None:
            raise ValueError("pass `input_ids`, e.g. `steer.generate(**tokenizer(text, return_tensors='pt'))`.")
        input_ids = torch.as_tensor(input_ids, device=self.device)
        input_ids = input_ids.unsqueeze(0) if input_ids.dim() == 1 else input_ids
        want_dict = kwargs.pop("return_dict_in_generate", None)
        if want_dict is None:
            want_dict = bool(gen_config.return_dict_in_generate)
        repeat = expected_rows(input_ids, kwargs, gen_config) // input_ids.shape[0]
        has_pixels = any(kwargs.get(k) is not None for k in ("pixel_values", "pixel_values_videos"))
        image_rows = rows_with_images(input_ids, self.root.config, has_pixels).cpu().repeat_interleave(repeat)
        if self.alignment is None:
            image_rows = torch.zeros_like(image_rows)
        processors = LogitsProcessorList(kwargs.pop("logits_processor", None) or [])
        with StepRecorder(self.root) as recorder:
            proc = SafeSteerLogitsProcessor(self, recorder, input_ids.shape[1], image_rows.shape[0])
            processors.append(proc)
            hook = None
            if self.alignment is not None:
                module = self.arch.tap_module(self.alignment.layer)
                hook = _AlignmentHook(module, self.alignment.delta, image_rows, recorder)
            with hook if hook is not None else contextlib.nullcontext():
                out = self.root.generate(
                    input_ids=input_ids, attention_mask=attention_mask, logits_processor=processors,
                    return_dict_in_generate=True, **kwargs,
                )  # fmt: skip
        self.last_processor = proc
        self.last_alignment_hook = hook
        unsafe = proc.flagged_top1 | proc.refusing
        scores = torch.tensor([max(s) if s else 0.0 for s in proc.top1_scores])
        attach_metadata(
            out,
            safety=[UNSAFE if u else SAFE for u in unsafe.tolist()],
            safety_scores=scores,
            probe_scores=proc.top1_scores,
            interventions=proc.interventions,
            refused=proc.refusing.tolist(),
            candidate_forwards=proc.candidate_forwards,
            msav_rows=image_rows.tolist(),
        )
        return out if want_dict else out.sequences


SafeSteerDecoding = SafeSteer
