"""SafeCoDe's decoding step: the contrast against the noised image and the refusal-token modulation.

`SafeCoDeLogitsProcessor` runs inside the model's own `generate` (built by `SafeCoDe.generate` for each call): for
the first `steps` steps it runs the noised branch (`z_cd = z(v) - alpha * z(v~)`, own KV cache) and moves the
refusal tokens by the verdict. The tensor math is in plain functions so it can be checked on its own; what the
two modes do step by step: docs/defenses.md, "SafeCoDe".

Example:
    >>> import torch
    >>> real, noised = torch.tensor([[2.0, 1.0]]), torch.tensor([[1.0, 1.0]])
    >>> contrastive_logits(real, noised, 0.5, torch.tensor([True]))
    tensor([[1.5000, 0.5000]])
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from transformers import LogitsProcessor

from safegate.defenses.decoding import StepRecorder, force_tokens
from safegate.defenses.judges import SAFE, UNSAFE
from safegate.modeling.kv_cache import CACHE_KWARG, output_cache, without_cache

if TYPE_CHECKING:
    from safegate.defenses.safecode import SafeCoDe

QUOTE_LIKE = frozenset({'"', "'", "\u201c", "\u201d", "\u2018", "\u2019", "`", "\u00b4"})
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
