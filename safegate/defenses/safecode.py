"""SafeCoDe (arXiv 2509.19212): contrastive decoding against a noised image, steered by a judge's verdict.

Training-free: a safety judge says per request whether it is `safe` or `unsafe` (`safegate.defenses.judges`);
for the first `steps` tokens the logits are contrasted with those of a noised image and refusal tokens are boosted
or suppressed (`safegate.defenses.contrastive`); then decoding goes on normally. `mode="paper"` (default) or
`mode="official"` (the authors' code path). How one call runs and what the modes do: docs/defenses.md, "SafeCoDe".

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
from dataclasses import replace
from typing import Any

import torch
from transformers import LogitsProcessorList

from safegate.data.refusals import REFUSAL_PREFIXES
from safegate.defenses.contrastive import SafeCoDeLogitsProcessor
from safegate.defenses.decoding import (
    DropInSurface,
    StepRecorder,
    attach_metadata,
    check_generate_kwargs,
    expected_rows,
    rows_with_images,
)
from safegate.defenses.judges import (
    JUDGE_CONTRACT,
    UNSAFE,
    HFSafetyJudge,
    JudgeRequest,
    SafetyJudge,
    Verdict,
    coerce_verdict,
    image_digest,
)
from safegate.defenses.pixels import image_stats, images_from_pixels, neutral_pixels
from safegate.modeling.arch import resolve
from safegate.modeling.tokens import text_tokenizer

MODES = ("paper", "official")
REFUSAL_STRINGS = REFUSAL_PREFIXES  # the paper's refusal set R (Table 5), kept in safegate.data.refusals
PREFERRED_KEYWORDS = ("sorry", "apologize", "unable", "cannot", "can't", "not allowed", "as an ai", "not able to")
PIXEL_KEYS = ("pixel_values", "pixel_values_videos")


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


# ------------------------------------------------------------------------------------------- the defense
class SafeCoDe(DropInSurface):
    """SafeCoDe decoding around a Hugging Face (multimodal) model; see the module docstring.

    Args:
        model: the model (Qwen2.5-Omni: its thinker generates; kwargs prefixed `thinker_` are accepted).
        processor: its processor or tokenizer.
        judge (`SafetyJudge | Callable | None`): verdict judge; default `HFSafetyJudge(model, processor)` (the
            model judges itself, OUR CHOICE for an offline default; the paper uses GPT-4o, see
            `OpenAISafetyJudge`). A plain callable gets the list of `JudgeRequest`s and returns one verdict per
            request: `"safe"`/`"unsafe"` (any case) or a `Verdict`.
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
        judge: SafetyJudge | None = None,
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
            kind = type(judge).__name__
            raise TypeError(f"`judge` must be a SafetyJudge or a callable, got {kind}; {JUDGE_CONTRACT}.")
        self.model = model
        self.processor = processor
        self.tokenizer = text_tokenizer(processor)
        self.arch = resolve(model)
        self.root = self.arch.root
        self.judge = judge if judge is not None else HFSafetyJudge(model, processor)
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
            requests = self.judge_requests(input_ids, attention_mask, kwargs, judge_prompts, images)
            answers = self.judge(requests)
            if isinstance(answers, (str, Verdict)) or not isinstance(answers, Sequence):
                answers = [answers] if len(requests) == 1 and isinstance(answers, (str, Verdict)) else answers
            if not isinstance(answers, Sequence) or isinstance(answers, str) or len(answers) != len(requests):
                got = f"{len(answers)} answers" if isinstance(answers, Sequence) else type(answers).__name__
                raise ValueError(f"the judge returned {got} for {len(requests)} requests; {JUDGE_CONTRACT}.")
            return [coerce_verdict(a, f"the judge (request {i})") for i, a in enumerate(answers)]
        if len(verdicts) != input_ids.shape[0]:
            raise ValueError(
                f"`verdicts` must hold one entry per prompt row ({input_ids.shape[0]}), got {len(verdicts)}."
            )
        out = []
        for v in verdicts:
            if not isinstance(v, (str, Verdict)):
                raise ValueError(f"`verdicts` entries must be 'safe', 'unsafe' or a Verdict, got {v!r}.")
            try:
                verdict = coerce_verdict(v, "`verdicts`")
            except ValueError:
                raise ValueError(f"`verdicts` entries must be 'safe', 'unsafe' or a Verdict, got {v!r}.") from None
            out.append(replace(verdict, raw="given") if isinstance(v, str) else verdict)
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
