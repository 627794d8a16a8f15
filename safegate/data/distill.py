"""Self-distillation: fill missing training answers from the base model itself, each generated once (disk cache).

Benign prompts get the model's own greedy answer; harmful ones its answer under `REFUSAL_SYSTEM_PROMPT` when it
plainly refuses, else a templated refusal. Why training on the model's own answers keeps its utility, and how the
cache is keyed, is in `docs/real-model.md` ("Self-distilled training answers").

Example:
    >>> from safegate.testing import tiny_model_and_tokenizer
    >>> import tempfile
    >>> from safegate.data.refusals import REFUSAL_TEMPLATES
    >>> model, tok = tiny_model_and_tokenizer("qwen2")
    >>> rows = [{"prompt": "Write malware.", "label": "unsafe"}]
    >>> out = self_distill(model, tok, rows, cache_dir=tempfile.mkdtemp(), model_refusals=False, progress=False)
    >>> out[0]["response_source"], out[0]["response"] in REFUSAL_TEMPLATES
    ('template-refusal', True)
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from safegate.data.io import read_jsonl
from safegate.data.records import LABELS
from safegate.data.refusals import REFUSAL_SYSTEM_PROMPT, is_refusal, template_refusal

logger = logging.getLogger(__name__)


def self_distill(
    model: Any,
    tokenizer: Any,
    records: Sequence[dict[str, Any]],
    system_prompt: str = REFUSAL_SYSTEM_PROMPT,
    cache_dir: str | Path | None = None,
    *,
    judge: Callable[[list[str]], list[bool]] | None = None,
    model_refusals: bool = True,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Fill missing `response`s from the base model itself, generating each at most once (disk cache).

    Benign records (`label == "safe"`) get the model's own greedy answer under its default chat template.
    Harmful records get its greedy answer under `system_prompt`; that answer is kept only when `judge` calls it
    a refusal and it says plainly that it will not help (`is_refusal(answer, explicit=True)`: "I can't",
    "I won't", ...), otherwise a templated refusal (`template_refusal`, stable per prompt) is used; with
    `model_refusals=False` harmful records get templated refusals without any generation (for models that
    never refuse, such as SmolLM2-135M, this saves half the generation time). Records that already have a
    response are returned unchanged. Each filled record gets `response_source`: `model`,
    `model-refusal` or `template-refusal`.

    Args:
        model: the *base* causal LM (before `safegate.attach`).
        tokenizer: its tokenizer or processor (with a chat template).
        records: prompt records.
        system_prompt: the strict refusal system prompt used for harmful prompts.
        cache_dir: cache root (default `$SAFEGATE_CACHE` or `~/.cache/safegate`); generations go to `distill/`.
        judge: refusal judge, `texts -> [is_refusal]` (default: `RefusalClassifier.load_or_fit()` when the
            encoder wheel is installed, else `is_refusal`).
        model_refusals: try the model's own refusal for harmful prompts before falling back to a template.
        max_new_tokens: answer length cap.
        batch_size: prompts per `generate` call.
        progress: show a progress bar.

    Returns:
        New record dicts, in the input order.
    """
    from safegate.backbones.builtin import cache_root
    from safegate.modeling.tokens import text_tokenizer

    if type(model).__name__ == "SafeGateModel":
        raise TypeError("`model` is a SafeGateModel; self-distil with the base model (before `safegate.attach`).")
    tok = text_tokenizer(tokenizer)
    if not getattr(tok, "chat_template", None):
        raise ValueError("`tokenizer` has no chat template; self-distillation needs a chat model's tokenizer.")
    out = [dict(r) for r in records]
    for number, record in enumerate(out, start=1):
        if record.get("label") not in LABELS or not isinstance(record.get("prompt"), str):
            raise ValueError(
                f"`records` item {number} needs a string `prompt` and a `label` of 'safe' or 'unsafe', got "
                f"prompt={record.get('prompt')!r:.60} label={record.get('label')!r}."
            )
    todo = [i for i, r in enumerate(out) if not r.get("response")]
    if not todo:
        return out
    settings = f"greedy:{max_new_tokens}"
    cache = DistillCache(
        (Path(cache_dir).expanduser() if cache_dir is not None else cache_root()) / "distill", model_key(model)
    )
    requests = []  # (record index, system prompt or None, cache key)
    for i in todo:
        if out[i]["label"] == "unsafe" and not model_refusals:
            continue
        system = system_prompt if out[i]["label"] == "unsafe" else None
        requests.append((i, system, _digest(f"{system or ''}\0{out[i]['prompt']}\0{settings}")))
    missing = [req for req in requests if cache.get(req[2]) is None]
    if missing:
        _generate_into(model, tok, out, missing, cache, max_new_tokens, batch_size, progress)
    harmful = [(i, key) for i, system, key in requests if system is not None]
    verdicts = (judge or _default_judge())([cache.get(key) or "" for _, key in harmful]) if harmful else []
    own = {i: cache.get(key) or "" for (i, key), refuses in zip(harmful, verdicts) if refuses}
    for i in todo:
        if out[i]["label"] != "unsafe":
            continue
        answer = own.get(i, "")
        if answer and is_refusal(answer, explicit=True):
            out[i].update(response=answer, response_source="model-refusal")
        else:
            out[i].update(response=template_refusal(out[i]["prompt"]), response_source="template-refusal")
    for i, system, key in requests:
        if system is None:
            out[i].update(response=cache.get(key), response_source="model")
    return out


class DistillCache:
    """Append-only JSONL of `{"key", "response"}` per model fingerprint (`<folder>/<model key>.jsonl`).

    A line cut short by an interrupted run is skipped, so its answer is generated again.
    """

    def __init__(self, folder: Path, model_key: str) -> None:
        self.path = folder / f"{model_key}.jsonl"
        self.entries: dict[str, str] = {}
        if self.path.is_file():
            for _, row in read_jsonl(self.path, allow_empty=True, keep_bad_lines=True):
                if isinstance(row, dict) and {"key", "response"} <= row.keys():
                    self.entries[row["key"]] = row["response"]

    def get(self, key: str) -> str | None:
        return self.entries.get(key)

    def put(self, key: str, response: str) -> None:
        self.entries[key] = response
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({"key": key, "response": response}, ensure_ascii=False) + "\n")


def model_key(model: Any) -> str:
    """A fingerprint of the model: its name, size and a few embedding rows (differs when the weights differ)."""
    import torch

    config = getattr(model, "config", None)
    name = str(getattr(config, "_name_or_path", "") or getattr(config, "model_type", "") or type(model).__name__)
    embed = model.get_input_embeddings().weight.detach()
    rows = torch.cat([embed[:2].flatten(), embed[-2:].flatten()]).float().cpu().numpy().tobytes()
    size = sum(p.numel() for p in model.parameters())
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(name).name or "model")[:40]
    fingerprint = _digest(f"{name}\0{size}\0{hashlib.sha256(rows).hexdigest()}")
    return f"{slug}-{fingerprint[:16]}"


def _generate_into(
    model: Any, tok: Any, records: list[dict[str, Any]], requests: list[tuple[int, str | None, str]],
    cache: DistillCache, max_new_tokens: int, batch_size: int, progress: bool,
) -> None:  # fmt: skip
    import torch
    from tqdm.auto import tqdm

    from safegate.modeling.tokens import padding_id

    def chat(i: int, system: str | None) -> str:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": records[i]["prompt"]}
        ]
        return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    texts = {key: chat(i, system) for i, system, key in requests}
    ordered = sorted(requests, key=lambda req: len(texts[req[2]]))  # similar lengths share a batch
    side, tok.padding_side = tok.padding_side, "left"
    device = next(model.parameters()).device
    try:
        bar = tqdm(total=len(ordered), desc="safegate: self-distilling responses", unit="prompt", disable=not progress)
        with bar, torch.inference_mode():
            for start in range(0, len(ordered), batch_size):
                batch = ordered[start : start + batch_size]
                enc = tok([texts[key] for _, _, key in batch], return_tensors="pt", padding=True,
                          add_special_tokens=False).to(device)  # fmt: skip
                generated = model.generate(
                    **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=padding_id(tok)
                )
                new = generated[:, enc["input_ids"].shape[1] :]
                for (_, _, key), ids in zip(batch, new):
                    cache.put(key, tok.decode(ids, skip_special_tokens=True).strip())
                bar.update(len(batch))
    finally:
        tok.padding_side = side


def _default_judge() -> Callable[[list[str]], list[bool]]:
    from safegate.data.refusal_classifier import RefusalClassifier

    try:
        return RefusalClassifier.load_or_fit().predict_refusal
    except ImportError as err:
        logger.warning("refusal classifier unavailable (%s); judging refusals with keywords only", err)
        return lambda texts: [is_refusal(t) for t in texts]


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
