"""SafeSteer's probe and alignment vector: fit them on labelled prompts, save and load them (no pickle).

`fit_probe` fits the logistic probe over the hidden states of generated tokens (OUR CHOICE of procedure,
methods.md §3.5); `fit_alignment_vector` computes the modal semantic alignment vector (MSAV) from harmful prompts
in text form and in image form (`typographic_records`); `save_steering`/`load_steering` keep both in one
safetensors file. `safegate.defenses.SafeSteer` uses them while decoding.

Example:
    >>> import torch
    >>> probe = LinearProbe(torch.ones(4), 0.0, torch.zeros(4), torch.ones(4), layer=2, tau=0.9)
    >>> round(float(probe(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))[0]), 4), probe.layer
    (0.7311, 2)
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from safegate.defenses.decoding import eos_ids
from safegate.modeling.arch import resolve
from safegate.modeling.tokens import text_tokenizer

SAFE, UNSAFE = "safe", "unsafe"
TYPOGRAPHIC_INSTRUCTION = "The image shows a request. Read it and respond to it."


# ------------------------------------------------------------------------------------------------ the probe
class LinearProbe(nn.Module):
    """Logistic probe `s(h) = sigmoid(w . (h - mean) / std + b)` over hidden states of one layer (P1).

    Attributes:
        layer (`int`): the decoder layer it reads (`-1` = the final norm), as in `ResolvedArch.tap_module`.
        tau (`float`): decision threshold (set at a 5% false-positive rate by `fit_probe`).
        metrics (`dict`): fitting report (validation AUROC per layer, positions used, ...).
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | float,
        mean: torch.Tensor,
        std: torch.Tensor,
        layer: int,
        tau: float = 0.5,
        metrics: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.register_buffer("weight", torch.as_tensor(weight, dtype=torch.float32).flatten())
        self.register_buffer("bias", torch.as_tensor(bias, dtype=torch.float32).reshape(()))
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).flatten())
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).flatten())
        self.layer = int(layer)
        self.tau = float(tau)
        self.metrics = dict(metrics or {})

    def logit(self, hidden: torch.Tensor) -> torch.Tensor:
        h = hidden.float().to(self.weight.device)
        return ((h - self.mean) / self.std) @ self.weight + self.bias

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """p(harmful) for hidden states `(..., d)`."""
        return torch.sigmoid(self.logit(hidden))

    def save(self, path: str | os.PathLike, alignment: AlignmentVector | None = None) -> None:
        """Write the probe (and an optional MSAV) to one safetensors file."""
        save_steering(path, self, alignment)

    @classmethod
    def load(cls, path: str | os.PathLike) -> LinearProbe:
        return load_steering(path)[0]


@dataclass
class AlignmentVector:
    """Modal semantic alignment vector (MSAV, P4): `gamma * scale * v_hat` is added at `layer` after the prefill.

    Attributes:
        vector (`torch.Tensor`): unit direction `mean h(text form) - mean h(image form)` at `layer`.
        layer (`int`): decoder layer whose output receives it (`-1` = the final norm).
        gamma (`float`): strength (OUR CHOICE: 4.0, to be tuned on validation data).
        scale (`float`): mean hidden-state norm at `layer` (makes `gamma` model-independent).
    """

    vector: torch.Tensor
    layer: int
    gamma: float = 4.0
    scale: float = 1.0
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def delta(self) -> torch.Tensor:
        return self.vector.float() * (self.gamma * self.scale)


def save_steering(path: str | os.PathLike, probe: LinearProbe, alignment: AlignmentVector | None = None) -> None:
    """Save a probe and an optional alignment vector to a safetensors file (no pickle)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in probe.state_dict().items()}
    meta: dict[str, Any] = {"layer": probe.layer, "tau": probe.tau, "metrics": probe.metrics, "format": "safesteer/1"}
    if alignment is not None:
        tensors["align.vector"] = alignment.vector.detach().float().cpu().contiguous()
        meta["alignment"] = {"layer": alignment.layer, "gamma": alignment.gamma, "scale": alignment.scale}
    save_file(tensors, str(path), metadata={"safegate": json.dumps(meta)})


def load_steering(path: str | os.PathLike) -> tuple[LinearProbe, AlignmentVector | None]:
    """Load what `save_steering` wrote; `ValueError` if the file is not a SafeSteer file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get("safegate")
        if raw is None:
            raise ValueError(f"{path}: not a SafeSteer file (no `safegate` metadata); write it with save_steering().")
        meta = json.loads(raw)
        t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    probe = LinearProbe(t["weight"], t["bias"], t["mean"], t["std"], meta["layer"], meta["tau"], meta["metrics"])
    alignment = None
    if "alignment" in meta:
        a = meta["alignment"]
        alignment = AlignmentVector(t["align.vector"], a["layer"], a["gamma"], a["scale"])
    return probe, alignment


# ------------------------------------------------------------------------------------------------ fitting
def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve (Mann-Whitney, ties averaged); `nan` if a class is missing.

    Example:
        >>> auroc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1]))
        0.75
    """
    scores, labels = scores.double().flatten(), labels.bool().flatten()
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = scores.argsort()
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    for value in scores.unique():  # average ranks of ties
        tie = scores == value
        if int(tie.sum()) > 1:
            ranks[tie] = ranks[tie].mean()
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def fit_logistic(x: torch.Tensor, y: torch.Tensor, c: float = 1.0, max_iter: int = 200) -> tuple[Any, ...]:
    """L2-regularised logistic regression on standardised features (sklearn's objective with `C=c`), by L-BFGS.

    Returns `(weight, bias, mean, std)` for `LinearProbe`.
    """
    x, y = x.double(), y.double()
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
    z = (x - mean) / std
    w = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = c * nn.functional.binary_cross_entropy_with_logits(z @ w + b, y, reduction="sum") + 0.5 * w @ w
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach().float(), b.detach().float(), mean.float(), std.float()


def _image(value: Any) -> Any:
    if isinstance(value, (str, os.PathLike)):
        from PIL import Image

        return Image.open(value).convert("RGB")
    return value


def encode_records(
    model: Any, processor: Any, records: Sequence[Mapping[str, Any]], system_prompt: str | None = None
) -> dict[str, Any]:
    """Left-padded model inputs for prompt records (`prompt` or `messages`, optional `images` / `audios`)."""
    from safegate.data.records import format_prompt

    if any(r.get("images") or r.get("audios") for r in records):
        from safegate.data.multimodal import MultimodalInputBuilder

        prompts = [r.get("prompt") or r["messages"][-1]["content"] for r in records]
        images = [[_image(i) for i in r["images"]] if r.get("images") else None for r in records]
        audios = [list(r["audios"]) if r.get("audios") else None for r in records]
        return MultimodalInputBuilder(model, processor).encode(prompts, images, audios, system=system_prompt)
    tok = text_tokenizer(processor)
    texts = [format_prompt(processor, dict(r), system_prompt) for r in records]
    return dict(tok(texts, return_tensors="pt", padding=True, add_special_tokens=False))


def _valid_record(record: Any) -> bool:
    if not isinstance(record, Mapping) or record.get("label") not in (SAFE, UNSAFE):
        return False
    return bool(record.get("prompt") or record.get("messages"))


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class _LayerTaps:
    """Forward hooks keeping, per layer, the outputs of decoding-step forwards (every call after the first)."""

    def __init__(self, modules: dict[int, nn.Module]) -> None:
        self.modules = modules
        self.states: dict[int, list[torch.Tensor]] = {layer: [] for layer in modules}
        self.calls: dict[int, int] = dict.fromkeys(modules, 0)
        self.handles: list[Any] = []

    def __enter__(self) -> _LayerTaps:
        for layer, module in self.modules.items():

            def hook(mod: nn.Module, args: Any, output: Any, layer: int = layer) -> None:
                self.calls[layer] += 1
                if self.calls[layer] > 1:
                    h = output[0] if isinstance(output, (tuple, list)) else output
                    self.states[layer].append(h[:, -1].detach().float().cpu())

            self.handles.append(module.register_forward_hook(hook))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()


@torch.no_grad()
def collect_decoding_states(
    model: Any,
    processor: Any,
    records: Sequence[Mapping[str, Any]],
    layers: Sequence[int],
    max_new_tokens: int = 32,
    batch_size: int = 8,
    system_prompt: str | None = None,
) -> tuple[dict[int, list[torch.Tensor]], list[int]]:
    """Greedy-decode each record and keep, per layer, the hidden state of every generated token (up to EOS).

    Returns `({layer: [(n_i, d) per record]}, lengths)`; state j of a record is that of its j-th generated token.
    """
    arch = resolve(model)
    tok = text_tokenizer(processor)
    modules = {layer: arch.tap_module(layer) for layer in layers}
    stops = set(eos_ids(arch.root.generation_config, tok))
    pad = tok.pad_token_id if tok.pad_token_id is not None else (min(stops) if stops else 0)
    per_layer: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    lengths: list[int] = []
    device = arch.embed.weight.device
    for batch in _batches(list(records), batch_size):
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in encode_records(
            model, processor, batch, system_prompt).items()}  # fmt: skip
        with _LayerTaps(modules) as taps:
            out = arch.root.generate(
                **inputs, max_new_tokens=max_new_tokens + 1, do_sample=False, pad_token_id=pad,
                return_dict_in_generate=True,
            )  # fmt: skip
        generated = out.sequences[:, inputs["input_ids"].shape[1] :].cpu()
        for row in range(generated.shape[0]):
            n = 0
            for token in generated[row, :max_new_tokens].tolist():
                n += 1
                if token in stops:
                    break
            n = min(n, len(taps.states[layers[0]]))
            lengths.append(n)
            for layer in layers:
                steps = taps.states[layer][:n]
                per_layer[layer].append(
                    torch.stack([s[row] for s in steps]) if steps else torch.zeros(0, arch.embed.weight.shape[1])
                )
    return per_layer, lengths


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


@torch.no_grad()
def last_prompt_states(model: Any, processor: Any, inputs: Any, layer: int, batch_size: int = 8) -> torch.Tensor:
    """Hidden state at `layer` of the last prompt position, per row, for records or ready input batches."""
    arch = resolve(model)
    module = arch.tap_module(layer)
    device = arch.embed.weight.device
    batches = [inputs] if isinstance(inputs, Mapping) else None
    if batches is None:
        items = list(inputs)
        if items and isinstance(items[0], Mapping) and "input_ids" in items[0]:
            batches = items
        else:
            batches = [encode_records(model, processor, b) for b in _batches(items, batch_size)]
    out = []
    for batch in batches:
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        captured: list[torch.Tensor] = []

        def keep(mod: nn.Module, args: Any, output: Any, store: list[torch.Tensor] = captured) -> None:
            store.append(output[0] if isinstance(output, (tuple, list)) else output)

        handle = module.register_forward_hook(keep)
        try:
            arch.root(**batch)
        finally:
            handle.remove()
        h = captured[0]
        mask = batch.get("attention_mask")
        last = (
            mask.shape[1] - 1 - mask.flip(-1).long().argmax(-1)
            if isinstance(mask, torch.Tensor)
            else torch.full((h.shape[0],), h.shape[1] - 1)
        )
        out.append(h[torch.arange(h.shape[0]), last.to(h.device)].float().cpu())
    return torch.cat(out)


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
