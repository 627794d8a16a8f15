"""SafeCoDe (arXiv 2509.19212): contrastive decoding against a noised image, steered by a judge's verdict.

Training-free. Before decoding, a judge captions the image and says whether the request is `safe` or `unsafe`
in that context (verdicts cached by input hash, see `safegate.defenses.judges`). During the first `steps`
decoding steps the logits of the real image are contrasted with those of a Gaussian-noised copy,
`z_cd = z(v) - alpha * z(v~)` (a second forward pass with its own KV cache, fed the same token ids), and the
refusal tokens among the top-k are boosted (`unsafe`) or suppressed (`safe`). Then decoding goes on normally on
the real branch. Text-only rows skip the contrast and get only the verdict's modulation.

Two modes (`methods.md` §2): `mode="paper"` (default) is the paper's form: additive `+/- boost` on refusal ids in
`TopK(z_cd)`, greedy first token, then the configured sampler. `mode="official"` follows the authors' code:
probability reweighting of every refusal id (safe: x(1 - boost/2), contrast alpha/2), a forced refusal phrase for
`unsafe`, early exit from the guided phase, and verdict-dependent temperature/top-p for the continuation when
sampling (greedy everywhere when `do_sample=False`, the deterministic evaluation mode).

Both are a `LogitsProcessor` inside the model's own `generate`, so streamers, stopping criteria, `max_new_tokens`
and batching behave as usual.

Example:
    >>> from safegate.testing import tiny_model_and_tokenizer, chat
    >>> from safegate.defenses.judges import FunctionJudge
    >>> model, tok = tiny_model_and_tokenizer("qwen2")
    >>> defense = SafeCoDe(model, tok, judge=FunctionJudge(lambda prompt, image: "bomb" in prompt))
    >>> out = defense.generate(**chat(tok, ["Build a bomb", "Bake bread"]), max_new_tokens=4,
    ...                        return_dict_in_generate=True)
    >>> out.safety, out.safety_scores.tolist(), out.neutral_forwards
    (['unsafe', 'safe'], [1.0, 0.0], 0)
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from safegate.data.refusals import REFUSAL_PREFIXES
from safegate.defenses.decoding import (
    DropInSurface,
    StepRecorder,
    attach_metadata,
    check_generate_kwargs,
    expected_rows,
    force_tokens,
    rows_with_images,
)
from safegate.defenses.judges import SAFE, UNSAFE, HFJudge, Judge, JudgeRequest, Verdict, image_digest
from safegate.defenses.pixels import image_stats, images_from_pixels, neutral_pixels
from safegate.modeling.arch import resolve
from safegate.modeling.kv_cache import CACHE_KWARG, output_cache, without_cache
from safegate.modeling.tokens import text_tokenizer

MODES = ("paper", "official")
REFUSAL_STRINGS = REFUSAL_PREFIXES  # the paper's refusal set R (Table 5), kept in safegate.data.refusals
PREFERRED_KEYWORDS = ("sorry", "apologize", "unable", "cannot", "can't", "not allowed", "as an ai", "not able to")
QUOTE_LIKE = frozenset({'"', "'", "\u201c", "\u201d", "\u2018", "\u2019", "`", "\u00b4"})
PIXEL_KEYS = ("pixel_values", "pixel_values_videos")
# official continuation samplers per verdict: (temperature, top_p)
CONTINUATION = {SAFE: (0.8, 0.9), UNSAFE: (0.7, 0.85)}
GUIDED_TEMPERATURE = {SAFE: 0.8, UNSAFE: 0.7}


# ------------------------------------------------------------------------------------------- pure tensor math
def contrastive_logits(
    real: torch.Tensor, neutral: torch.Tensor, alpha: float | torch.Tensor, rows: torch.Tensor
) -> torch.Tensor:
    """`real - alpha * neutral` in the rows flagged by `rows` (bool (B,)), `real` elsewhere (S2)."""
    alpha = torch.as_tensor(alpha, dtype=real.dtype, device=real.device).reshape(-1, 1)
    return torch.where(rows.view(-1, 1).to(real.device), real - alpha * neutral.to(real.dtype), real)


def modulate_refusal(
    scores: torch.Tensor, refusal_ids: torch.Tensor, unsafe: torch.Tensor, boost: float, top_k: int
) -> torch.Tensor:
    """Paper form (S4): `+boost` (unsafe rows) or `-boost` (safe rows) on refusal ids inside each row's top-k.

    Example:
        >>> scores = torch.tensor([[3.0, 2.0, 1.0, 0.0], [3.0, 2.0, 1.0, 0.0]])
        >>> modulate_refusal(scores, torch.tensor([1, 3]), torch.tensor([True, False]), 1.0, top_k=2)
        tensor([[3., 3., 1., 0.],
                [3., 1., 1., 0.]])
    """
    k = min(top_k, scores.shape[-1])
    in_top = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, scores.topk(k, dim=-1).indices, True)
    is_refusal = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
    is_refusal[refusal_ids.to(scores.device)] = True
    sign = torch.where(unsafe.to(scores.device), 1.0, -1.0).to(scores.dtype).view(-1, 1)
    return torch.where(in_top & is_refusal, scores + sign * boost, scores)


def reweight_refusal(probs: torch.Tensor, refusal_ids: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Official form (S5): multiply p of every refusal id by the row's `factor` (B,) and renormalise."""
    out = probs.clone()
    ids = refusal_ids.to(probs.device)
    out[:, ids] = out[:, ids] * factor.view(-1, 1).to(probs.device, probs.dtype)
    total = out.sum(-1, keepdim=True)
    return torch.where(total > 0, out / total.clamp_min(1e-30), probs)


def top_p_filter(scores: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep each row's smallest set of tokens with cumulative probability >= its `top_p` (B,); others -inf."""
    sorted_scores, order = scores.sort(dim=-1, descending=True)
    cumulative = sorted_scores.softmax(-1).cumsum(-1)
    drop_sorted = (cumulative - sorted_scores.softmax(-1)) >= top_p.view(-1, 1).to(cumulative.device, cumulative.dtype)
    drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)
    return scores.masked_fill(drop, float("-inf"))


# ------------------------------------------------------------------------------------------- refusal ids
def refusal_first_token_ids(tokenizer: Any, strings: Sequence[str] = REFUSAL_STRINGS) -> list[int]:
    """Paper-mode refusal set R (OUR CHOICE, methods.md §2.4): the first token of each string, with and without a
    leading space."""
    ids = set()
    for text in strings:
        for variant in (text, " " + text):
            tokens = tokenizer(variant, add_special_tokens=False)["input_ids"]
            if tokens:
                ids.add(int(tokens[0]))
    return sorted(ids)


def refusal_all_token_ids(tokenizer: Any, strings: Sequence[str] = REFUSAL_STRINGS) -> list[int]:
    """Official-mode refusal set R_ids (S5): every token id of every string, special tokens excluded."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids = set()
    for text in strings:
        ids.update(int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"] if i not in special)
    return sorted(ids)


# ------------------------------------------------------------------------------------------- the processor
class SafeCoDeLogitsProcessor(LogitsProcessor):
    """One SafeCoDe decoding (see the module docstring); built by `SafeCoDe.generate` for each call."""

    supports_continuous_batching = False

    def __init__(
        self,
        defense: SafeCoDe,
        recorder: StepRecorder,
        prompt_length: int,
        unsafe: torch.Tensor,
        contrast_rows: torch.Tensor,
        neutral_inputs: dict[str, torch.Tensor],
        prefill_inputs: dict[str, Any],
        do_sample: bool,
    ) -> None:
        self.d = defense
        self.recorder = recorder
        self.prompt_length = prompt_length
        self.unsafe = unsafe
        self.contrast_rows = contrast_rows
        self.neutral_inputs = neutral_inputs
        self.prefill_inputs = prefill_inputs
        self.do_sample = do_sample
        self.cache: Any = None
        self.neutral_forwards = 0
        self.fed: list[tuple[torch.Tensor, torch.Tensor]] = []  # (real ids, neutral ids) per neutral forward
        rows = unsafe.shape[0]
        self.guided = torch.ones(rows, dtype=torch.bool)
        self.guided_length = [0] * rows
        self.forced: list[list[int] | None] = [None] * rows
        self.phrases: list[str | None] = [None] * rows
        self._needs_neutral = bool(contrast_rows.any())

    # ---------------------------------------------------------------------------------------- branches
    def _neutral_logits(self, step: int) -> torch.Tensor:
        last = self.recorder.last
        if last is None:
            raise RuntimeError("SafeCoDe saw no forward of the model before its logits; cannot run the noised branch")
        kwargs = dict(last)
        if step == 0:
            # `generate` may have encoded the images before the prefill (`mm_encoder_outputs`) and removed the
            # pixel inputs: the noised branch gets the user's multimodal inputs back, with noised pixels.
            if kwargs.pop("mm_encoder_outputs", None) is not None or self.neutral_inputs:
                kwargs.update({k: v for k, v in self.prefill_inputs.items() if k not in kwargs})
            kwargs.update(self.neutral_inputs)
            kwargs = without_cache(kwargs)
            kwargs[CACHE_KWARG], kwargs["use_cache"] = None, True
        else:
            if self.cache is None:
                raise RuntimeError("the noised branch's cache was released before the last guided step")
            kwargs = without_cache(kwargs)
            kwargs[CACHE_KWARG] = self.cache
        with self.recorder.paused(), torch.no_grad():
            out = self.d.root(**kwargs)
        self.neutral_forwards += 1
        self.fed.append((last["input_ids"].detach().clone(), kwargs["input_ids"].detach().clone()))
        self.cache = output_cache(out)
        return out.logits[:, -1].float()

    def release(self) -> None:
        """Drop the noised branch's cache (after the guided steps, or when generation ends)."""
        self.cache = None
        self._needs_neutral = False

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_length
        if self.d.mode == "official":
            return self._official(input_ids, scores, step)
        if step >= self.d.steps:
            self.release()
            return scores
        z = scores
        if self._needs_neutral:
            z = self._contrast(scores, self._neutral_logits(step), self.d.alpha)
        z = modulate_refusal(z, self.d.refusal_ids, self.unsafe.to(z.device), self.d.boost, self.d.top_k)
        for row in range(z.shape[0]):
            self.guided_length[row] = step + 1
        if step == 0 and self.do_sample:  # methods.md §2.4 step 4: greedy first token, then the sampler
            z = force_tokens(z, torch.ones(z.shape[0], dtype=torch.bool), z.argmax(-1))
        if step + 1 >= self.d.steps:
            self.release()
        return z

    def _contrast(self, scores: torch.Tensor, neutral: torch.Tensor, alpha: float | torch.Tensor) -> torch.Tensor:
        rows = self.contrast_rows.to(scores.device)
        z = contrastive_logits(scores, neutral, alpha, rows)
        if self.d.plausibility > 0:  # OUR CHOICE, optional: keep tokens with p_real >= plausibility * max p_real
            p = scores.softmax(-1)
            implausible = p < self.d.plausibility * p.max(-1, keepdim=True).values
            z = torch.where(rows.view(-1, 1) & implausible, torch.full_like(z, float("-inf")), z)
        return z

    # ---------------------------------------------------------------------------------------- official (S5)
    def _official(self, input_ids: torch.Tensor, scores: torch.Tensor, step: int) -> torch.Tensor:
        tok = self.d.tokenizer
        rows = scores.shape[0]
        if step >= 1:  # the token chosen at step-1 is known now: early exit of safe rows (S5)
            for row in range(rows):
                if self.guided[row] and not self.unsafe[row] and step - 1 >= 1:
                    words = tok.decode(input_ids[row, self.prompt_length :], skip_special_tokens=True).split()
                    if len(words) >= 2 and len(words[0]) >= 2 and words[0][0].isupper():
                        self.guided[row] = False
        if step >= self.d.steps:
            self.guided[:] = False
        if self._needs_neutral and not bool((self.guided & self.contrast_rows.cpu()).any()):
            self.release()
        out = scores.clone()
        guided = self.guided.clone()
        if guided.any():
            neutral = self._neutral_logits(step) if self._needs_neutral else None
            alpha = torch.where(self.unsafe, self.d.alpha, 0.5 * self.d.alpha).to(scores)
            zcd = self._contrast(scores, neutral, alpha) if neutral is not None else scores
            probs = zcd.softmax(-1)
            for row in range(rows):
                if guided[row]:
                    out[row] = self._official_guided_row(row, step, zcd[row], probs[row])
        for row in range(rows):  # continuation rows: verdict-dependent sampler (S5)
            if not guided[row] and self.do_sample:
                temperature, top_p = CONTINUATION[UNSAFE if self.unsafe[row] else SAFE]
                out[row] = top_p_filter(scores[row : row + 1] / temperature, torch.tensor([top_p]))[0]
        return out

    def _official_guided_row(self, row: int, step: int, zcd: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        d = self.d
        one_hot = torch.full_like(zcd, float("-inf"))
        if self.unsafe[row] and d.steps >= 2 and step == 0 and self.forced[row] is None:
            self.forced[row], self.phrases[row] = d.best_refusal_phrase(probs)
        if self.unsafe[row] and self.forced[row]:
            forced = self.forced[row]
            if step < len(forced):
                self.guided_length[row] = step + 1
                one_hot[forced[step]] = 0.0
                if step + 1 >= len(forced):
                    self.guided[row] = False
                return one_hot
            self.guided[row] = False
            return zcd
        # token-wise path: safe rows, and unsafe rows without a phrase (fallback); OUR CHOICE: also unsafe rows
        # when steps < 2 (the official code then falls into the safe path and *suppresses* refusals)
        verdict = UNSAFE if self.unsafe[row] else SAFE
        factor = torch.tensor([1.0 + d.boost if verdict == UNSAFE else max(0.0, 1.0 - 0.5 * d.boost)])
        p = reweight_refusal(probs.view(1, -1), d.official_refusal_ids, factor)[0]
        self.guided_length[row] = step + 1
        if step == 0:
            top = p.topk(min(2, p.shape[-1])).indices.tolist()
            choice = top[0]
            if verdict == SAFE and len(top) > 1 and d.tokenizer.decode([choice]).strip() in QUOTE_LIKE:
                choice = top[1]
            one_hot[choice] = 0.0
            return one_hot
        if not self.do_sample:
            one_hot[int(p.argmax())] = 0.0
            return one_hot
        return torch.log(p + 1e-10) / GUIDED_TEMPERATURE[verdict]


# ------------------------------------------------------------------------------------------- the defense
class SafeCoDe(DropInSurface):
    """SafeCoDe decoding around a Hugging Face (multimodal) model; see the module docstring.

    Args:
        model: the model (Qwen2.5-Omni: its thinker generates; kwargs prefixed `thinker_` are accepted).
        processor: its processor or tokenizer.
        judge (`Judge | None`): verdict judge; default `HFJudge(model, processor)` (the model judges itself,
            OUR CHOICE for an offline default; the paper uses GPT-4o, see `OpenAIJudge`).
        alpha (`float`): contrast weight (0.3, official default).
        noise_sigma (`float`): std of the pixel noise in [0, 1] units (0.1).
        boost (`float`): lambda_boost = lambda_supp (1.0).
        top_k (`int`): size of the top-k set the paper form modulates (20).
        steps (`int`): number of guided steps N_steps (5); no noised forward runs after them.
        mode (`str`): `"paper"` (S2+S4, default) or `"official"` (the authors' code path, S5).
        refusal_strings (`Sequence[str]`): the refusal list.
        plausibility (`float`): optional contrastive-decoding plausibility cut (0 = off, not in SafeCoDe).
        seed (`int`): seed of the noise generator (same noise for the same call).
        image_mean / image_std: normalisation of `pixel_values` (default: the processor's, else OpenAI-CLIP).
    """

    name = "safecode"

    def __init__(
        self,
        model: Any,
        processor: Any,
        judge: Judge | None = None,
        alpha: float = 0.3,
        noise_sigma: float = 0.1,
        boost: float = 1.0,
        top_k: int = 20,
        steps: int = 5,
        mode: str = "paper",
        refusal_strings: Sequence[str] = REFUSAL_STRINGS,
        plausibility: float = 0.0,
        seed: int = 0,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}.")
        for arg, value in (("alpha", alpha), ("boost", boost), ("plausibility", plausibility)):
            if not (isinstance(value, (int, float)) and value >= 0):
                raise ValueError(f"`{arg}` must be a number >= 0, got {value!r}.")
        if not (isinstance(noise_sigma, (int, float)) and noise_sigma > 0):
            raise ValueError(f"`noise_sigma` must be > 0 (pixel units in [0, 1]), got {noise_sigma!r}.")
        if not (isinstance(top_k, int) and top_k >= 1):
            raise ValueError(f"`top_k` must be an int >= 1, got {top_k!r}.")
        if not (isinstance(steps, int) and steps >= 0):
            raise ValueError(f"`steps` must be an int >= 0, got {steps!r}.")
        if judge is not None and not callable(judge):
            raise TypeError(f"`judge` must be a safegate.defenses.judges.Judge, got {type(judge).__name__}.")
        self.model = model
        self.processor = processor
        self.tokenizer = text_tokenizer(processor)
        self.arch = resolve(model)
        self.root = self.arch.root
        self.judge = judge if judge is not None else HFJudge(model, processor)
        self.alpha, self.noise_sigma, self.boost = float(alpha), float(noise_sigma), float(boost)
        self.top_k, self.steps, self.mode = top_k, steps, mode
        self.plausibility, self.seed = float(plausibility), seed
        self.refusal_strings = tuple(refusal_strings)
        self.refusal_ids = torch.tensor(
            refusal_first_token_ids(self.tokenizer, self.refusal_strings), dtype=torch.long
        )
        self.official_refusal_ids = torch.tensor(
            refusal_all_token_ids(self.tokenizer, self.refusal_strings), dtype=torch.long
        )
        self.image_mean, self.image_std = image_stats(processor, image_mean, image_std)
        self.last_processor: SafeCoDeLogitsProcessor | None = None

    # ---------------------------------------------------------------------------------------- judge
    def judge_requests(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        inputs: dict[str, Any],
        judge_prompts: Sequence[str] | None = None,
        images: Sequence[Any] | None = None,
    ) -> list[JudgeRequest]:
        """One `JudgeRequest` per prompt row: the prompt text and the row's first image."""
        rows = input_ids.shape[0]
        for arg, value in (("judge_prompts", judge_prompts), ("images", images)):
            if value is not None and len(value) != rows:
                raise ValueError(f"`{arg}` must hold one entry per prompt row ({rows}), got {len(value)}.")
        if judge_prompts is None:
            mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
            judge_prompts = [
                self.tokenizer.decode(ids[m.bool()], skip_special_tokens=True).strip()
                for ids, m in zip(input_ids, mask)
            ]
        has_image = rows_with_images(input_ids, self.root.config, any(k in inputs for k in PIXEL_KEYS)).tolist()
        if images is None:
            images = images_from_pixels(input_ids, inputs, self.root.config, self.image_mean, self.image_std)
        requests = []
        for row in range(rows):
            image = images[row]
            if isinstance(image, (list, tuple)):
                image = image[0] if image else None
            key = None
            if image is None and has_image[row]:  # the image could not be rebuilt: key on this row's pixels
                key = image_digest(inputs["pixel_values"]) + f"#row{row}" if "pixel_values" in inputs else None
            requests.append(JudgeRequest(str(judge_prompts[row]), image, key))
        return requests

    def best_refusal_phrase(self, probs: torch.Tensor) -> tuple[list[int] | None, str | None]:
        """Official unsafe path: the refusal string whose tokens carry the most contrastive probability
        (strings with an apology/inability keyword first), cut to `steps` tokens."""
        ranked = []
        for text in self.refusal_strings:
            ids = [i for i in self.tokenizer(text, add_special_tokens=False)["input_ids"] if i < probs.shape[-1]]
            if ids:
                ranked.append((float(probs[ids].sum()), text, ids))
        if not ranked:
            return None, None
        ranked.sort(key=lambda item: -item[0])
        preferred = [r for r in ranked if any(k in r[1].lower() for k in PREFERRED_KEYWORDS)]
        _, text, ids = (preferred or ranked)[0]
        return ids[: self.steps], text

    # ---------------------------------------------------------------------------------------- generate
    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        verdicts: Sequence[str | Verdict] | None = None,
        judge_prompts: Sequence[str] | None = None,
        images: Sequence[Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Drop-in for `model.generate` with SafeCoDe decoding.

        Args:
            verdicts: per prompt row, `"safe"`/`"unsafe"` (or `Verdict`s) to use instead of asking the judge.
            judge_prompts: per prompt row, the request text the judge sees (default: the decoded prompt).
            images: per prompt row, the original image (PIL) for the judge's caption (default: rebuilt from
                `pixel_values` where the layout is known).
            **kwargs: anything `model.generate` accepts (`pixel_values`, `max_new_tokens`, `do_sample`, ...).

        Returns:
            Token ids, or with `return_dict_in_generate=True` the usual output plus `.safety` (the verdict per
            row), `.safety_scores` (the judge's p(unsafe) per row), `.verdicts`, `.captions`, `.guided_prefix`
            (text of the guided steps), `.contrast_rows` (rows that had an image), `.neutral_forwards`, and
            `.refusal_phrases` (official mode, unsafe rows).
        """
        prefix = self.arch.spec.kwarg_prefix
        if prefix:
            kwargs = {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in kwargs.items()}
        gen_config = kwargs.get("generation_config") or self.generation_config
        check_generate_kwargs(kwargs, gen_config)
        if input_ids is None:
            raise ValueError("pass `input_ids`, e.g. `defense.generate(**processor(text=..., images=...))`.")
        input_ids = torch.as_tensor(input_ids, device=self.device)
        input_ids = input_ids.unsqueeze(0) if input_ids.dim() == 1 else input_ids
        if attention_mask is not None:
            attention_mask = torch.as_tensor(attention_mask, device=self.device)
            attention_mask = attention_mask.unsqueeze(0) if attention_mask.dim() == 1 else attention_mask
        want_dict = kwargs.pop("return_dict_in_generate", None)
        if want_dict is None:
            want_dict = bool(gen_config.return_dict_in_generate)
        verdict_list = self._verdicts(input_ids, attention_mask, kwargs, verdicts, judge_prompts, images)
        repeat = expected_rows(input_ids, kwargs, gen_config) // input_ids.shape[0]
        unsafe = torch.tensor([v.label == UNSAFE for v in verdict_list]).repeat_interleave(repeat)
        has_pixels = any(kwargs.get(k) is not None for k in PIXEL_KEYS)
        contrast_rows = rows_with_images(input_ids, self.root.config, has_pixels).cpu().repeat_interleave(repeat)
        neutral = self._neutral_inputs(kwargs) if bool(contrast_rows.any()) and self.steps > 0 else {}
        if neutral and repeat > 1:
            raise ValueError(
                f"`num_return_sequences={repeat}` with image inputs: SafeCoDe's noised branch needs one image per "
                "decoded row; repeat the inputs in the batch instead."
            )
        do_sample = bool(kwargs.get("do_sample", gen_config.do_sample))
        if self.mode == "official" and do_sample:
            overridden = [k for k in ("temperature", "top_p", "top_k") if kwargs.get(k) is not None]
            if overridden:
                warnings.warn(
                    f"SafeCoDe mode='official' sets its own verdict-dependent samplers; ignoring {overridden}.",
                    stacklevel=2,
                )
            kwargs.update(temperature=1.0, top_p=1.0, top_k=0)
        processors = LogitsProcessorList(kwargs.pop("logits_processor", None) or [])
        with StepRecorder(self.root) as recorder:
            proc = SafeCoDeLogitsProcessor(
                self,
                recorder,
                input_ids.shape[1],
                unsafe,
                contrast_rows,
                neutral,
                self._forward_inputs(kwargs),
                do_sample,
            )
            processors.append(proc)
            try:
                out = self.root.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    logits_processor=processors,
                    return_dict_in_generate=True,
                    **kwargs,
                )
            finally:
                proc.release()
        self.last_processor = proc
        labels = [v.label for v in verdict_list]
        prompt_length = input_ids.shape[1]
        guided = [
            self.tokenizer.decode(out.sequences[row, prompt_length : prompt_length + n], skip_special_tokens=True)
            for row, n in enumerate(proc.guided_length)
        ]
        attach_metadata(
            out,
            safety=[label for label in labels for _ in range(repeat)],
            safety_scores=torch.tensor([v.score for v in verdict_list]).repeat_interleave(repeat),
            verdicts=verdict_list,
            captions=[v.caption for v in verdict_list],
            guided_prefix=guided,
            contrast_rows=contrast_rows.tolist(),
            neutral_forwards=proc.neutral_forwards,
            refusal_phrases=list(proc.phrases),
        )
        return out if want_dict else out.sequences

    def _verdicts(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        kwargs: dict[str, Any],
        verdicts: Sequence[str | Verdict] | None,
        judge_prompts: Sequence[str] | None,
        images: Sequence[Any] | None,
    ) -> list[Verdict]:
        if verdicts is None:
            return self.judge(self.judge_requests(input_ids, attention_mask, kwargs, judge_prompts, images))
        if len(verdicts) != input_ids.shape[0]:
            raise ValueError(
                f"`verdicts` must hold one entry per prompt row ({input_ids.shape[0]}), got {len(verdicts)}."
            )
        out = []
        for v in verdicts:
            if isinstance(v, Verdict):
                out.append(v)
            elif v in (SAFE, UNSAFE):
                out.append(Verdict(v, 1.0 if v == UNSAFE else 0.0, raw="given"))
            else:
                raise ValueError(f"`verdicts` entries must be 'safe', 'unsafe' or a Verdict, got {v!r}.")
        return out

    def _forward_inputs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The user's tensor inputs that the model's forward takes (multimodal inputs for the noised prefill)."""
        params = set(inspect.signature(self.root.forward).parameters)
        return {k: v for k, v in kwargs.items() if k in params and isinstance(v, torch.Tensor)}

    def _neutral_inputs(self, kwargs: dict[str, Any]) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed)
        vision = getattr(self.root.config, "vision_config", None)
        temporal = getattr(vision, "temporal_patch_size", None)
        temporal = temporal if isinstance(temporal, int) else None
        out = {}
        for key in PIXEL_KEYS:
            if kwargs.get(key) is not None:
                out[key] = neutral_pixels(
                    kwargs[key], self.noise_sigma, generator, self.image_mean, self.image_std,
                    temporal_patch_size=temporal, same_over_time=key == "pixel_values",
                )  # fmt: skip
        return out
