"""The bundle's model card (README.md): metadata from `ModelHubMixin`, a summary table and the evaluation table.

Example:
    >>> evaluation_rows({"JB-Prompt": {"asr": 0.0}, "auroc": 0.97})
    [{'name': 'JB-Prompt', 'asr': 0.0}, {'metric': 'auroc', 'value': 0.97}]
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from safegate.hub.files import PAPER_URL
from safegate.modeling.config import GateConfig


def model_card(metadata: ModelCardData, config: dict[str, Any], payload_bytes: int) -> ModelCard:
    """The README.md of a bundle with `config` (`safegate_config.json`) and `payload_bytes` of tensor data.

    `metadata` is the card data `ModelHubMixin` collected (library, tags, paper); the base model is added when
    the backbone is a Hub repo id rather than a local path.
    """
    data = ModelCardData(**metadata.to_dict())
    base = config["backbone"]["name_or_path"]
    if re.fullmatch(r"[\w.-]+/[\w.-]+", base) and not os.path.exists(base):
        data.base_model = base
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{card_body(config, payload_bytes)}")


def evaluation_rows(evaluation: Mapping | Sequence | None) -> list[dict[str, Any]] | None:
    """Normalise an evaluation table to a JSON list of row dicts (`ValueError` naming `evaluation` otherwise)."""
    if evaluation is None:
        return None
    if isinstance(evaluation, Mapping):
        rows = [
            {"name": str(k), **v} if isinstance(v, Mapping) else {"metric": str(k), "value": v}
            for k, v in evaluation.items()
        ]
    elif (
        isinstance(evaluation, Sequence)
        and not isinstance(evaluation, str)
        and all(isinstance(r, Mapping) for r in evaluation)
    ):
        rows = [dict(r) for r in evaluation]
    else:
        raise ValueError(
            "`evaluation` must be a list of rows (dicts) or a mapping name -> {column: value} / name -> value, "
            f"got {type(evaluation).__name__}."
        )
    try:
        return json.loads(json.dumps(rows, allow_nan=False))
    except (TypeError, ValueError) as err:
        raise ValueError(f"`evaluation` must hold only JSON values (str, numbers, bools, None): {err}") from err


def card_body(config: dict[str, Any], payload_bytes: int) -> str:
    """Markdown body of the bundle's README.md (the YAML header comes from `ModelHubMixin` metadata)."""
    b, tokens = config["backbone"], config["tokens"]
    g = GateConfig.from_dict(config["gate_config"]).to_dict()  # fields an older bundle omits: their defaults
    base = b["name_or_path"] or f"a `{b['model_type']}` model"
    gated = f"`{b['gated_module']}` of " if b.get("gated_module") else ""
    lora = f"r={g['lora_r']}, alpha={g['lora_alpha']} on {g['lora_target'] or ', '.join(g['lora_modules'])}"
    lora = lora if g["lora_r"] else "none (gate and token rows only)"
    threshold = "argmax of the gated pair" if g["threshold"] is None else f"p(unsafe) >= {g['threshold']}"
    lines = [
        f"# safegate bundle for {base}",
        "",
        "A CASA safety gate (Classification Augmented with Safety Attention, "
        f"[arXiv 2604.00310]({PAPER_URL})) made with safegate. Before the "
        f"model answers, it emits `{tokens['safe']}` or `{tokens['unsafe']}`, chosen by a small attention gate over "
        "the prompt's hidden states; the answer is conditioned on that token.",
        "",
        "```python",
        "import safegate",
        f"gated = safegate.load_bundle(model, tokenizer_or_processor, {'<this repo or folder>'!r})",
        "out = gated.generate(**inputs, return_dict_in_generate=True)   # out.safety, out.safety_scores",
        "```",
        "",
        "| | |",
        "|---|---|",
        f"| base model | {base} (gate on {gated}`{b['model_type']}`; hidden {b['hidden_size']}, "
        f"{b['num_layers']} layers, {b['vocab_rows']} vocab rows, {'tied' if b['tied'] else 'untied'} head) |",
        f"| safety tokens | `{tokens['safe']}`, `{tokens['unsafe']}` |",
        f"| gate | attention_dim={g['attention_dim']}, aggregation={g['aggregation']}, scaling={g['scaling']}, "
        f"layer={g['layer']}, members={g.get('members', 1)} |",
        f"| LoRA | {lora} |",
        f"| decision | {threshold} |",
        f"| recipe | {config.get('recipe') or '(not recorded)'} |",
        f"| tensor bytes | {payload_bytes} |",
        "",
        "## Evaluation",
        "",
    ]
    rows = config.get("evaluation") or []
    if rows:
        columns = list(dict.fromkeys(k for row in rows for k in row))
        lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
    else:
        lines.append("No evaluation was recorded with this bundle.")
    lines += ["", "Format: `safegate_config.json`, `safegate.safetensors`, `adapter/` (PEFT). See safegate's "
              "`docs/bundle-format.md`."]  # fmt: skip
    return "\n".join(lines) + "\n"
