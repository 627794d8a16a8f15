"""Fitting SafeSteer's probe (`fit_probe`) and alignment vector (`fit_alignment_vector`) on labelled prompts.

The procedure is OUR CHOICE (methods.md §3.5; docs/defenses.md, "SafeSteer"): an L2 logistic regression per
candidate layer over the hidden states of generated tokens, the layer with the best validation AUROC wins, and
the threshold sits at a 5% false-positive rate. `typographic_records` builds the image forms of harmful prompts.

Example:
    >>> import torch
    >>> x = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    >>> weight, bias, mean, std = fit_logistic(x, torch.tensor([0.0, 0.0, 1.0, 1.0]))
    >>> bool(weight[0] > 0)
    True
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from safegate.defenses.hidden_states import collect_decoding_states, last_prompt_states
from safegate.defenses.probe import AlignmentVector, LinearProbe
from safegate.evaluation.metrics import auroc
from safegate.modeling.arch import resolve

SAFE, UNSAFE = "safe", "unsafe"
TYPOGRAPHIC_INSTRUCTION = "The image shows a request. Read it and respond to it."


def fit_logistic(
    x: torch.Tensor, y: torch.Tensor, c: float = 1.0, max_iter: int = 200, balanced: bool = False
) -> tuple[Any, ...]:
    """L2-regularised logistic regression on standardised features (sklearn's objective with `C=c`), by L-BFGS.

    `balanced` weights each row by `n / (2 * n_its_class)` (sklearn's `class_weight="balanced"`), so both classes
    weigh the same whatever their sizes. Returns `(weight, bias, mean, std)` for `LinearProbe`.
    """
    x, y = x.double(), y.double()
    rows = torch.ones_like(y)
    if balanced:
        positive = y.mean()
        rows = torch.where(y > 0.5, 0.5 / positive, 0.5 / (1 - positive))
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
    z = (x - mean) / std
    w = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        fit = nn.functional.binary_cross_entropy_with_logits(z @ w + b, y, weight=rows, reduction="sum")
        loss = c * fit + 0.5 * w @ w
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach().float(), b.detach().float(), mean.float(), std.float()


def _valid_record(record: Any) -> bool:
    if not isinstance(record, Mapping) or record.get("label") not in (SAFE, UNSAFE):
        return False
    return bool(record.get("prompt") or record.get("messages"))


def fit_probe(
    model: Any,
    processor: Any,
    records: Any,
    layer: int | Sequence[int] | None = None,
    *,
    max_new_tokens: int = 32,
    eval_positions: int = 16,
    val_fraction: float = 0.2,
    fpr: float = 0.05,
    c: float = 1.0,
    batch_size: int = 8,
    seed: int = 0,
    system_prompt: str | None = None,
) -> LinearProbe:
    """Fit SafeSteer's logistic probe on labelled prompts (OUR CHOICE of procedure, methods.md §3.5).

    The frozen model greedily generates `max_new_tokens` tokens per prompt; every generated position's hidden
    state gets the prompt's label (`unsafe` = 1). Records are split by prompt (stratified) into train and
    validation; for each candidate layer an L2 logistic regression (`C=c`) is fitted and the layer with the best
    validation AUROC over the first `eval_positions` positions wins. `tau` is set at `fpr` false positives on
    harmless validation states.

    Args:
        records: list of `{"prompt" | "messages", "label", "images"?, "audios"?}` dicts (images as PIL images or
            paths) or a JSONL path / `datasets.Dataset` (validated by `safegate.data.records.load_records`).
        layer: a decoder layer (`-1` = final norm), a list to sweep, or `None` = sweep every decoder layer.
    """
    from safegate.data.records import label_id, load_records

    if isinstance(records, (list, tuple)):  # in-memory records may carry PIL images (files are validated below)
        bad = [i for i, r in enumerate(records) if not _valid_record(r)]
        if bad:
            raise ValueError(
                f"`records` {bad[:10]}: each record needs `prompt` (or `messages`) and `label` 'safe' or 'unsafe'."
            )
        records = [dict(r) for r in records]
    else:
        records = load_records(records, require_response=False)
    arch = resolve(model)
    layers = list(range(len(arch.layers))) if layer is None else ([layer] if isinstance(layer, int) else list(layer))
    for candidate in layers:
        arch.tap_module(candidate)  # validates the index
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"`val_fraction` must be in [0, 1), got {val_fraction!r}.")
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"`fpr` must be in (0, 1), got {fpr!r}.")
    labels = [label_id(r["label"]) for r in records]
    if len(set(labels)) < 2:
        raise ValueError("`records` must hold both 'safe' and 'unsafe' prompts to fit a probe.")
    rng = random.Random(seed)
    val: set[int] = set()
    for cls in (0, 1):
        idx = [i for i, lab in enumerate(labels) if lab == cls]
        rng.shuffle(idx)
        n_val = int(round(val_fraction * len(idx)))
        if val_fraction > 0 and len(idx) - n_val >= 1 and n_val >= 1:
            val.update(idx[:n_val])
    states, lengths = collect_decoding_states(model, processor, records, layers, max_new_tokens, batch_size,
                                              system_prompt)  # fmt: skip

    def stack(rows: Sequence[int], layer_: int, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        xs = [states[layer_][i][:limit] for i in rows]
        ys = [torch.full((x.shape[0],), labels[i], dtype=torch.float32) for i, x in zip(rows, xs)]
        return torch.cat(xs), torch.cat(ys)

    train = [i for i in range(len(records)) if i not in val]
    check = sorted(val) if val else train
    report: dict[str, float] = {}
    best: tuple[float, int, Any] | None = None
    for layer_ in layers:
        x, y = stack(train, layer_)
        if len(set(y.tolist())) < 2:
            raise ValueError("the model generated no tokens for one class; raise `max_new_tokens` or add prompts.")
        params = fit_logistic(x, y, c)
        probe = LinearProbe(*params, layer=layer_)
        xv, yv = stack(check, layer_, eval_positions)
        score = auroc(probe(xv), yv)
        score = float("nan") if score is None else score  # a validation set without one class
        report[str(layer_)] = score
        if best is None or (not math.isnan(score) and (math.isnan(best[0]) or score > best[0])):
            best = (score, layer_, params)
    assert best is not None
    score, chosen, params = best
    xv, yv = stack(check, chosen, eval_positions)
    harmless = LinearProbe(*params, layer=chosen)(xv[yv == 0])
    tau = float(torch.quantile(harmless, 1.0 - fpr)) if harmless.numel() else 0.5
    metrics = {
        "auroc": score, "auroc_per_layer": report, "tau_fpr": fpr, "validation": bool(val),
        "train_prompts": len(train), "val_prompts": len(val), "max_new_tokens": max_new_tokens,
        "eval_positions": eval_positions, "states": sum(lengths),
    }  # fmt: skip
    return LinearProbe(*params, layer=chosen, tau=tau, metrics=metrics)


def fit_alignment_vector(
    model: Any, processor: Any, text_inputs: Any, image_inputs: Any, layer: int, gamma: float = 4.0
) -> AlignmentVector:
    """MSAV (P4, OUR CHOICE): `mean h(text form) - mean h(image form)` of harmful queries at `layer`, unit norm,
    scaled by the mean hidden-state norm there. Inputs: records (`typographic_records` builds image forms) or
    ready input batches."""
    h_text = last_prompt_states(model, processor, text_inputs, layer)
    h_image = last_prompt_states(model, processor, image_inputs, layer)
    v = h_text.mean(0) - h_image.mean(0)
    if float(v.norm()) == 0.0:
        raise ValueError("the text and image forms gave identical mean states; the alignment vector is zero.")
    scale = float(torch.cat([h_text, h_image]).norm(dim=-1).mean())
    metrics = {"n_text": h_text.shape[0], "n_image": h_image.shape[0], "raw_norm": float(v.norm())}
    return AlignmentVector(v / v.norm(), layer, gamma, scale, metrics)


def typographic_records(
    prompts: Sequence[str], size: tuple[int, int] = (448, 448), instruction: str = TYPOGRAPHIC_INSTRUCTION
) -> list[dict[str, Any]]:
    """Image forms of `prompts` (FigStep/MM-SafetyBench style): the text typeset on a white image, plus a neutral
    instruction. Pair them with `[{"prompt": p} for p in prompts]` for `fit_alignment_vector`."""
    import textwrap

    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    out = []
    for prompt in prompts:
        image = Image.new("RGB", size, "white")
        draw = ImageDraw.Draw(image)
        draw.multiline_text((8, 8), "\n".join(textwrap.wrap(prompt, width=max(8, size[0] // 8))), fill="black",
                            font=font)  # fmt: skip
        out.append({"prompt": instruction, "images": [image], "label": UNSAFE})
    return out
