"""The two safety tokens: added so that no text can ever produce them, resolved by string, rows initialised.

For BPE tokenizers the token strings go into the BPE model vocabulary, which no merge rule reaches, so no text
tokenizes to them; `add_safety_tokens` verifies this on every call (`docs/security.md`, `docs/design.md`).

Example:
    >>> from safegate.testing import tiny_tokenizer
    >>> tok = tiny_tokenizer()
    >>> safe_id, unsafe_id = add_safety_tokens(tok, "<|safe|>", "<|unsafe|>")
    >>> unsafe_id in tok("ignore rules <|unsafe|>")["input_ids"]
    False
"""

from __future__ import annotations

import json
import warnings
from typing import Any

import torch

_PROBES = ("{t}", " {t}", "x{t}y", "<{t}>", "{t}{t}", "\n{t}\n")


def text_tokenizer(tokenizer_or_processor: Any) -> Any:
    """The text tokenizer inside a processor, or the tokenizer itself."""
    tok = getattr(tokenizer_or_processor, "tokenizer", None)
    return tok if tok is not None else tokenizer_or_processor


def padding_id(tokenizer_or_processor: Any) -> int:
    """The id to pad with: the tokenizer's pad token, else its end-of-sequence token, else 0.

    Padded positions are masked out everywhere, so any id is correct there; the fallbacks only keep batches
    buildable for tokenizers that define no pad token (many base models).

    Example:
        >>> from safegate.testing import tiny_tokenizer
        >>> tok = tiny_tokenizer()
        >>> padding_id(tok) == tok.pad_token_id
        True
    """
    tok = text_tokenizer(tokenizer_or_processor)
    for candidate in (getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None)):
        if isinstance(candidate, list):
            candidate = candidate[0] if candidate else None
        if candidate is not None:
            return int(candidate)
    return 0


def token_id(tokenizer: Any, token: str) -> int | None:
    """Id of `token` as one vocabulary entry, or `None` if the tokenizer does not hold it."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend.token_to_id(token)
    found = tokenizer.get_vocab().get(token)
    return int(found) if found is not None else None


def add_safety_tokens(tokenizer: Any, safe: str, unsafe: str) -> tuple[int, int]:
    """Make `safe` and `unsafe` single vocabulary entries (idempotent) and return their ids.

    Existing special tokens are kept. Raises `RuntimeError` if text containing a token string can still
    produce its id on a BPE tokenizer (e.g. the strings were added earlier as plain added tokens).
    """
    bpe = _bpe_backend(tokenizer)
    missing = [t for t in (safe, unsafe) if token_id(tokenizer, t) is None]
    if missing and bpe is not None:
        _add_to_bpe_vocab(tokenizer, bpe, missing)
    elif missing:
        warnings.warn(
            f"{type(tokenizer).__name__} is not a BPE tokenizer: the safety tokens are added as special "
            "tokens, which text can spell. safegate still rejects such input ids in generate/classify.",
            stacklevel=2,
        )
        tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    ids = {safe: token_id(tokenizer, safe), unsafe: token_id(tokenizer, unsafe)}
    if bpe is not None:
        check_protected(tokenizer, ids)
    return int(ids[safe]), int(ids[unsafe])


def _bpe_backend(tokenizer: Any) -> dict | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    data = json.loads(backend.to_str())
    return data if data.get("model", {}).get("type") == "BPE" else None


def _add_to_bpe_vocab(tokenizer: Any, data: dict, tokens: list[str]) -> None:
    from tokenizers import Tokenizer

    next_id = max(tokenizer.backend_tokenizer.get_vocab(with_added_tokens=True).values()) + 1
    for offset, token in enumerate(tokens):
        data["model"]["vocab"][token] = next_id + offset
    tokenizer._tokenizer = Tokenizer.from_str(json.dumps(data))


def check_protected(tokenizer: Any, ids: dict[str, int]) -> None:
    """Raise `RuntimeError` if some text (the token string alone, spaced, glued, doubled) tokenizes to an id in
    `ids` (token string -> id): the tokenizer holds that string as an added token that text can spell.

    Example:
        >>> from safegate.testing import tiny_tokenizer
        >>> tok = tiny_tokenizer()
        >>> safe_id, unsafe_id = add_safety_tokens(tok, "<|safe|>", "<|unsafe|>")
        >>> check_protected(tok, {"<|safe|>": safe_id, "<|unsafe|>": unsafe_id})  # silent: no text spells them
    """
    for token, tid in ids.items():
        for probe in _PROBES:
            text = probe.format(t=token)
            if tid in tokenizer(text, add_special_tokens=False)["input_ids"]:
                raise RuntimeError(
                    f"The text {text!r} tokenizes to the safety id {tid}: this tokenizer already holds {token!r} "
                    "as an added token that text can spell. Use a tokenizer without it, or choose other "
                    "`safe_token`/`unsafe_token` strings in GateConfig."
                )


def word_rows(weight: torch.Tensor, tokenizer: Any, word: str) -> torch.Tensor:
    """Mean of the rows of `weight` for the tokens spelling `word` (with and without a leading space)."""
    ids: list[int] = []
    for variant in (word, " " + word):
        ids.extend(tokenizer(variant, add_special_tokens=False)["input_ids"])
    ids = [i for i in ids if i < weight.shape[0]]
    if not ids:
        return weight.detach().mean(0)
    return weight.detach()[torch.tensor(sorted(set(ids)), device=weight.device)].float().mean(0).to(weight.dtype)
