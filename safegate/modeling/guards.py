"""What the gate checks, refuses or infers before it runs, so that its verdict depends only on the prompt and the gate.

- `check_generation_mode`: of transformers' decoding modes (`GenerationMode`) only greedy decoding and sampling run
  the prompt once and then one token per step, which is what the gate decides on; every other mode (beams,
  assisted / self-speculative / prompt-lookup / multi-token-prediction decoding, contrastive search, DoLa,
  constraints), a `custom_generate` recipe, token healing (it re-tokenizes the prompt) and paged continuous batching
  are refused, naming the argument that selected it, whether it came as an argument, in `generation_config=` or in
  the model's own generation config.
- `infer_attention_mask`: an omitted mask is inferred exactly as `generate` infers it (pad positions masked when the
  pad id occurs and differs from EOS, else all ones), once, and handed to every path.
- `check_embeds`: a prompt embedding that points towards a safety token's row more than towards any other token's
  is that safety token fed as an embedding, and is refused like such an id.
- `prepare_prompt`: all of the above for one call's prompt, plus its assistant prefixes (`modeling.turns`).

Example:
    >>> import torch
    >>> from transformers import GenerationConfig
    >>> check_generation_mode({"num_beams": 2}, GenerationConfig())
    Traceback (most recent call last):
    ...
    ValueError: `num_beams=2` selects beam search, which a safety gate cannot run: ...
    >>> infer_attention_mask(torch.tensor([[0, 0, 5, 6], [4, 5, 6, 7]]), {"pad_token_id": 0}, GenerationConfig())
    tensor([[0, 0, 1, 1],
            [1, 1, 1, 1]])
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import GenerationConfig
from transformers.generation.configuration_utils import GenerationMode

from safegate.modeling.inputs import check_prompt, main_input, per_token_inputs
from safegate.modeling.prefix import repeat_rows
from safegate.modeling.tokens import padding_id
from safegate.modeling.turns import scan_prefixes

if TYPE_CHECKING:
    from safegate.modeling.model import SafeGateModel

#: The modes that keep the verdict: the prompt is run once (the gate reads that pass), then one token per step.
KEEPS_THE_VERDICT = frozenset({GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE})
#: Per refused mode: the fields that select it, and why the gate cannot run it.
_REFUSED: dict[Any, tuple[tuple[str, ...], str]] = {
    GenerationMode.BEAM_SEARCH: (("num_beams",), "several hypotheses per row are scored and re-ranked"),
    GenerationMode.BEAM_SAMPLE: (("num_beams",), "several hypotheses per row are scored and re-ranked"),
    GenerationMode.GROUP_BEAM_SEARCH: (("num_beam_groups", "num_beams"), "hypotheses are scored and re-ranked"),
    GenerationMode.CONSTRAINED_BEAM_SEARCH: (("force_words_ids", "constraints"), "constraints re-rank hypotheses"),
    GenerationMode.CONTRASTIVE_SEARCH: (("penalty_alpha",), "candidates are re-ranked by their hidden states"),
    GenerationMode.DOLA_GENERATION: (("dola_layers",), "logits are contrasted with early layers' logits"),
    GenerationMode.ASSISTED_GENERATION: (
        ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit", "use_mtp"),
        "a draft (another model, an early exit of this one, extra heads or the prompt) proposes tokens that are "
        "verified in blocks, so the gate would read the draft's states or never see the safety step",
    ),
}
_NOT_A_MODE = {
    "custom_generate": "a custom decoding recipe runs instead of the decoding loop the gate hooks into",
    "token_healing": "token healing re-tokenizes the prompt after the gate's checks",
}


def effective_generation_config(kwargs: dict[str, Any], model_config: GenerationConfig) -> GenerationConfig:
    """The configuration `generate` will run with: `generation_config=` (or a fresh one), the model's values where it
    leaves a field unset, then the keyword arguments, as `GenerationMixin._prepare_generation_config` merges them."""
    passed = kwargs.get("generation_config")
    config = copy.deepcopy(passed) if passed is not None else GenerationConfig()
    fields = {k: v for k, v in model_config.to_dict().items() if hasattr(config, k)}
    config.update(**fields, defaults_only=True)
    config.update(**{k: v for k, v in kwargs.items() if k != "generation_config" and hasattr(config, k)})
    return config


def _is_set(value: Any, key: str) -> bool:
    if key in ("num_beams", "num_beam_groups"):
        return value is not None and value > 1
    return value not in (None, False)


def check_generation_mode(kwargs: dict[str, Any], model_config: GenerationConfig) -> None:
    """Raise `ValueError` naming the argument unless `generate` would decode greedily or by sampling."""
    for key, why in _NOT_A_MODE.items():
        if kwargs.get(key) not in (None, False):
            raise ValueError(f"`{key}={kwargs[key]!r}`: {why}; it is not supported with a safety gate.")
    config = effective_generation_config(kwargs, model_config)
    if config.token_healing:
        why = _NOT_A_MODE["token_healing"]
        raise ValueError(f"`token_healing=True`: {why}; it is not supported with a safety gate.")
    if config.cache_implementation == "paged":
        raise ValueError("`cache_implementation='paged'` (continuous batching) is not supported by the gate.")
    mode = config.get_generation_mode(kwargs.get("assistant_model"))
    if mode in KEEPS_THE_VERDICT:
        return
    fields, why = _REFUSED.get(mode, ((), "the gate does not know this decoding mode"))
    values = {**{f: getattr(config, f, None) for f in fields}, "assistant_model": kwargs.get("assistant_model")}
    chosen = [f for f in fields if _is_set(values[f], f)]
    name = f"`{chosen[0]}={values[chosen[0]]!r}`" if chosen else f"this generation configuration ({mode.value})"
    raise ValueError(
        f"{name} selects {mode.value.replace('_', ' ')}, which a safety gate cannot run: {why}. "
        "Use greedy decoding or sampling (leave the argument unset, also in `generation_config`)."
    )


def infer_attention_mask(
    input_ids: torch.Tensor, kwargs: dict[str, Any], model_config: GenerationConfig
) -> torch.Tensor:
    """The mask `generate` infers for `input_ids` when none is passed (`_prepare_attention_mask_for_generation`).

    Pad positions are masked when the pad id (`pad_token_id`, else the first EOS id) occurs in the ids and is not an
    EOS id; otherwise every position counts.
    """
    config = effective_generation_config(kwargs, model_config)
    eos = config.eos_token_id
    eos = [] if eos is None else ([int(e) for e in eos] if isinstance(eos, (list, tuple)) else [int(eos)])
    pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else None)
    ones = torch.ones(input_ids.shape[:2], dtype=torch.long, device=input_ids.device)
    if pad is None or int(pad) in eos or not bool((input_ids == int(pad)).any()):
        return ones
    return input_ids.ne(int(pad)).long()


#: How aligned (cosine) with a safety token's row a prompt embedding must be, besides being more aligned with it than
#: with any other token's row, to be read as that token. Unrelated vectors (image features) sit near 0 in the
#: thousands of dimensions of a language model; the row itself, scaled or with noise, near 1.
SIMILARITY_FLOOR = 0.5


@torch.no_grad()
def check_embeds(
    embed: nn.Module,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    safety_ids: tuple[int, int],
    chunk: int = 4096,
) -> None:
    """Raise `ValueError` if a position of `inputs_embeds` points (cosine) more towards a safety token's embedding
    than towards any other token's, and at least `SIMILARITY_FLOOR` towards it: the model would read it as that
    safety token, at any scale (pre-norm decoders normalise what they read). A tie with another token (the same
    direction) is that token. Costs one product per position and vocabulary row, on this path only."""
    flat = inputs_embeds.detach().reshape(-1, inputs_embeds.shape[-1]).float()
    positions = torch.arange(flat.shape[0], device=flat.device)
    if attention_mask is not None:
        keep = attention_mask.reshape(-1).to(flat.device) != 0
        positions, flat = positions[keep], flat[keep]
    if flat.shape[0] == 0:
        return
    device = embed.weight.device if hasattr(embed, "weight") else flat.device
    flat = torch.nn.functional.normalize(flat.to(device), dim=-1)
    safety = torch.tensor(safety_ids, device=device)

    def cosines(ids: torch.Tensor) -> torch.Tensor:
        return flat @ torch.nn.functional.normalize(embed(ids).float(), dim=-1).T

    to_safety = cosines(safety).max(1).values
    to_other = torch.full_like(to_safety, -1.0)
    vocab = embed.weight.shape[0] if hasattr(embed, "weight") else embed.num_embeddings
    for start in range(0, vocab, chunk):
        ids = torch.arange(start, min(start + chunk, vocab), device=device)
        ids = ids[~torch.isin(ids, safety)]
        if ids.numel():
            to_other = torch.maximum(to_other, cosines(ids).max(1).values)
    forged = (to_safety > to_other) & (to_safety >= SIMILARITY_FLOOR)
    if bool(forged.any()):
        width = inputs_embeds.shape[1]
        where = int(positions[forged.nonzero()[0, 0]])
        raise ValueError(
            f"`inputs_embeds` row {where // width}, position {where % width} is the embedding of a safety token "
            f"(it points towards the row of id {safety_ids[0]} or {safety_ids[1]} more than towards any other "
            "token's): this is an injection attempt and is refused. Pass `input_ids`, or embeddings of ordinary "
            "tokens."
        )


@dataclass
class Prompt:
    """A checked prompt: ids and mask (inferred where omitted), inputs, and each row's assistant prefix.

    `lengths`/`closed`: as `turns.PrefixScan`. `caller_ids`: the ids as passed where a header that merged with its
    prefix was split back (`input_ids` then differ from them), else `None`.
    """

    input_ids: torch.Tensor | None
    attention_mask: torch.Tensor | None
    kwargs: dict[str, Any]
    lengths: list[int]
    closed: list[bool]
    caller_ids: torch.Tensor | None = None


def prepare_prompt(gated: SafeGateModel, input_ids: Any, attention_mask: Any, kwargs: dict[str, Any]) -> Prompt:
    """Check the decoding mode and the prompt (safety ids, right padding, embeddings), infer an omitted mask, and
    find each row's assistant prefix."""
    check_generation_mode(kwargs, gated.generation_config)
    safety_ids = (gated.safe_token_id, gated.unsafe_token_id)
    spec, device = gated.arch.spec, gated.device
    input_ids = main_input(input_ids, kwargs, gated.get_input_embeddings())  # `inputs=`; ids with their embeddings
    input_ids, attention_mask = check_prompt(input_ids, attention_mask, kwargs, spec, device, safety_ids)
    if attention_mask is None and input_ids is not None:
        attention_mask = infer_attention_mask(input_ids, kwargs, gated.generation_config)
        if bool((attention_mask[:, -1] == 0).any()):
            raise ValueError(
                "no `attention_mask` was passed and a row of `input_ids` ends with the pad id: the mask `generate` "
                "infers marks that position as padding (right padding), and the gate would decide at a pad "
                "position. Pad on the left (`tokenizer.padding_side = 'left'`) and pass the mask."
            )
    if kwargs.get("inputs_embeds") is not None:
        check_embeds(gated.get_input_embeddings(), kwargs["inputs_embeds"], attention_mask, safety_ids)
    rows = input_ids.shape[0] if input_ids is not None else kwargs["inputs_embeds"].shape[0]
    markers = gated.chat_markers
    if input_ids is None or attention_mask is None or markers is None:
        return Prompt(input_ids, attention_mask, kwargs, [0] * rows, [False] * rows)
    per_token = per_token_inputs(input_ids, kwargs)
    pad_id = padding_id(gated.tokenizer)
    scan = scan_prefixes(input_ids, attention_mask, kwargs, markers, gated.tokenizer, pad_id, per_token)
    caller = input_ids if scan.rewritten else None
    return Prompt(scan.input_ids, scan.attention_mask, scan.kwargs, scan.lengths, scan.closed, caller)


def restore_caller_ids(out: Any, prompt: Prompt, keep_safety_token: bool) -> Any:
    """Returned sequences start with the caller's own ids, also where a merged header was split for the gate."""
    if prompt.caller_ids is not None and not keep_safety_token and prompt.input_ids is not None:
        caller = repeat_rows(prompt.caller_ids, out.sequences.shape[0] // prompt.caller_ids.shape[0])
        out.sequences = torch.cat([caller.to(out.sequences.device), out.sequences[:, prompt.input_ids.shape[1] :]], 1)
    return out
