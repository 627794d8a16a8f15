"""Evaluation harness: attack success rate and over-refusal of a gated model vs its own base model.

`evaluate(gated, datasets, attacks=..., judge=..., out_dir=...)` is the Python API; `safegate eval` the command
(see `docs/evaluation.md`). Modules: `data` (JSONL records), `attack_types`, `attacks` (text),
`media_attacks` (image, audio), `judges` (refusal judges), `endpoint` (the HTTP client of every API judge),
`defense` (what is evaluated, and the `DEFENSES` registry), `runner` (batched generation), `metrics`, `report`,
`plots`, `cli`.

Example:
    >>> from safegate.evaluation import parse_attacks, get_judge
    >>> [a.name for a in parse_attacks("none,prefill")]
    ['none', 'prefill:2', 'prefill:4', 'prefill:9', 'prefill:12']
    >>> get_judge("refusal").name
    'refusal'
"""

from __future__ import annotations

from safegate.evaluation.attacks import (
    ATTACK_NAMES,
    Attack,
    AttackContext,
    Case,
    InjectionAttack,
    NoAttack,
    PrefillAttack,
    SpokenAttack,
    Template,
    TemplateAttack,
    TypographicAttack,
    load_templates,
    parse_attacks,
)  # fmt: skip
from safegate.evaluation.data import DataError, Dataset, Record, from_records, load_dataset, load_datasets
from safegate.evaluation.defense import CasaDefense, DefendedBatch, Defense, register_defense
from safegate.evaluation.endpoint import ChatEndpoint, EndpointError
from safegate.evaluation.harness import build_cases, evaluate
from safegate.evaluation.judges import AnswerJudge, Judge, JudgeError, get_judge, register_judge
from safegate.evaluation.metrics import auroc, rate, rate_ci, relative_reduction
from safegate.evaluation.report import summary_table

__all__ = [
    "ATTACK_NAMES", "AnswerJudge", "Attack", "AttackContext", "Case", "CasaDefense", "ChatEndpoint", "DataError",
    "Dataset", "DefendedBatch", "Defense", "EndpointError", "InjectionAttack", "Judge", "JudgeError", "NoAttack",
    "PrefillAttack", "Record", "SpokenAttack", "Template", "TemplateAttack", "TypographicAttack", "auroc",
    "rate_ci", "build_cases", "evaluate", "from_records", "get_judge", "load_dataset", "load_datasets",
    "load_templates", "parse_attacks", "rate", "register_defense", "register_judge", "relative_reduction",
    "summary_table",
]  # fmt: skip
