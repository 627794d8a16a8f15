"""Leave-one-source-out (LOSO) generalization protocol for the gate (`benchmarks/generalization.py` runs it).

For each harmful source, the gate is fitted (gate-only `fit_gate`, frozen prompt states) on the *other* harmful
sources and a benign training pool, its threshold calibrated at a target false-positive rate on a benign validation
split of that pool, and it is scored on the left-out source against benign sets that are never trained on:

* harmful sources: `HARMFUL` (advbench, harmbench, do_not_answer, xstest_unsafe), or any list of harmful groups
  passed as `harmful` (e.g. with one more named set: `benchmarks/generalization.py --add-source`);
* benign training pool: `BENIGN_TRAIN` (XSTest-safe half A, Alpaca training split, hard negatives' training half);
* held-out benign: `BENIGN_HELD` (XSTest-safe half B, Alpaca held-out split, hard negatives' evaluation half, whose
  topics and templates are disjoint from the training half's).

Training prompts that equal an evaluation prompt (`safegate.data.leakage.normalise_prompt`) are dropped and counted,
then `check_disjoint` guards every fold. With `augment_share > 0`, each fold's training records (harmful and benign,
never the validation split) also get rephrased copies (`safegate.data.phrasing.augment_phrasing`, `augment_fold`);
copies equal to a validation or held-out prompt are dropped and counted the same way, and the check runs again.
Prompt states are computed once per group (`cache_prompts`) and stored on disk by `StateStore`, keyed by model, gate
layer, safety prompt and prompts, so re-running after a gate or fit change only re-fits (a fold's rephrased copies
are one more cached group). With `lora_args`, each fold then trains LoRA, gate and token rows jointly on its
training prompts (`safegate.train(verdict_only=True)`: the verdict alone, no answers) from a fresh adapter, and is
scored from the adapted model's own prompt states (computed per fold, not cached): does learning the representation
on a broad pool generalize better than a gate on frozen states?

Example (tiny random model, a few prompts per group):
    >>> import safegate
    >>> from safegate.backbones.tiny import tiny_model_and_tokenizer
    >>> model, tok = tiny_model_and_tokenizer("llama")
    >>> groups = {g: [{"prompt": f"{g} prompt {i}", "label": "unsafe" if g in HARMFUL else "safe"}
    ...               for i in range(4)] for g in HARMFUL + BENIGN_TRAIN + BENIGN_HELD}
    >>> report = run_protocol(model, tok, groups, config=safegate.GateConfig(attention_dim=8, lora_r=2),
    ...                       seeds=[0], fit_kwargs=dict(epochs=2))
    >>> list(report["summary"]) == HARMFUL + ["mean over sources"]
    True
"""

from __future__ import annotations

import copy
import statistics
from typing import Any

import torch

from safegate.data.build import split_records
from safegate.data.leakage import check_disjoint, near_duplicates, normalise_prompt, record_text
from safegate.data.phrasing import augment_phrasing
from safegate.evaluation.metrics import auroc, roc_curve
from safegate.modeling.model import attach
from safegate.training.gate_fit import cached_scores, fit_gate
from safegate.training.state_store import StateStore, concat_caches, subset_cache
from safegate.training.token_rows import head_rows, token_row_layer
from safegate.training.verdict_fold import adapted_scores, train_verdict

HARMFUL = ["advbench", "harmbench", "do_not_answer", "xstest_unsafe"]
BENIGN_TRAIN = ["xstest_safe_a", "alpaca_train", "hard_negatives_train"]
BENIGN_HELD = ["xstest_safe_b", "alpaca_held", "hard_negatives_eval"]
METRICS = ("auroc", "auroc_vs_xstest_safe_b", "auroc_vs_hard_negatives_eval", "auroc_vs_alpaca_held", "recall",
           "recall_shipped", "fpr_xstest_safe_b", "fpr_hard_negatives_eval", "fpr_alpaca_held",
           "fpr_xstest_safe_b_shipped", "threshold")  # fmt: skip
FIT_MODES = {  # what each fold fits: the ablation of issue 16 item 2 (safety attention vs the two token rows)
    "gate": {"train_gate": True, "train_token_rows": False},  # safety attention alone, rows as attached (default)
    "rows": {"train_gate": False, "train_token_rows": True},  # the two token rows alone, gate held constant
    "both": {"train_gate": True, "train_token_rows": True},
}
SPLIT_SEED = 0  # fixed data splits (XSTest halves, Alpaca held-out, in-source halves) never move with training seeds
SHIPPED_THRESHOLD = 0.5  # the gate's own decision: the unsafe token wins when p(unsafe) >= 0.5


# ------------------------------------------------------------------------------------------------ metrics
def threshold_at_fpr(benign_scores: Any, fpr: float = 0.05) -> float:
    """Smallest threshold `t` (one of the scores) with at most `fpr` of `benign_scores` strictly above it."""
    scores = torch.as_tensor(benign_scores, dtype=torch.float64).flatten().sort(descending=True).values
    if not len(scores):
        raise ValueError("threshold_at_fpr needs at least one benign validation score.")
    if not 0.0 <= fpr < 1.0:
        raise ValueError(f"`fpr` must be in [0, 1), got {fpr!r}.")
    return float(scores[min(int(fpr * len(scores)), len(scores) - 1)])


def flag_rate(scores: Any, threshold: float, inclusive: bool = False) -> float:
    """Share of `scores` flagged unsafe: above `threshold` (or at/above it with `inclusive`); nan when empty."""
    scores = torch.as_tensor(scores, dtype=torch.float64).flatten()
    if not len(scores):
        return float("nan")
    return float((scores >= threshold if inclusive else scores > threshold).double().mean())


def summarise(values: list[float]) -> dict[str, float]:
    """mean, std (sample; 0 for one value), min and max of the finite values (nan when none)."""
    finite = [v for v in values if v == v]
    if not finite:
        return {"mean": float("nan"), "std": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    std = statistics.stdev(finite) if len(finite) > 1 else 0.0
    return {"mean": statistics.fmean(finite), "std": std, "min": min(finite), "max": max(finite), "n": len(finite)}


# ------------------------------------------------------------------------------------------------ protocol
def group_names(harmful: list[str] | None = None) -> list[str]:
    """Every group of the protocol in its fixed order: the harmful sources (default `HARMFUL`), then the benign."""
    harmful = HARMFUL if harmful is None else harmful
    clash = sorted(set(harmful) & set(BENIGN_TRAIN + BENIGN_HELD))
    if not harmful or clash or len(set(harmful)) != len(harmful):
        raise ValueError(f"`harmful` must name distinct harmful groups, none of them benign, got {harmful!r}.")
    return [*harmful, *BENIGN_TRAIN, *BENIGN_HELD]


def check_groups(groups: dict[str, list[dict[str, Any]]], harmful: list[str] | None = None) -> None:
    """Every protocol group present, non-empty and labelled as its role says."""
    names = group_names(harmful)
    for name in names:
        records = groups.get(name)
        if not records:
            raise ValueError(f"protocol group {name!r} is missing or empty; it needs at least one record.")
        want = "unsafe" if name not in BENIGN_TRAIN + BENIGN_HELD else "safe"
        wrong = [r["prompt"][:60] for r in records if r.get("label") != want]
        if wrong:
            raise ValueError(f"group {name!r} must hold only {want!r} records; {len(wrong)} do not, e.g. {wrong[0]!r}")


def fold_split(
    groups: dict[str, list[dict[str, Any]]],
    left_out: str,
    seed: int,
    val_fraction: float = 0.2,
    harmful: list[str] | None = None,
    in_source: float = 0.0,
    drop_near_duplicates: bool = False,
) -> dict[str, Any]:
    """Global record indices of one fold: `train`, `val` (benign validation), `eval` groups; overlap dropped.

    `near_duplicates` counts the scored left-out prompts with a harmful training prompt that shares at least 40 % of
    their word trigrams (`safegate.data.leakage.near_duplicates`): paraphrases and templates, reported, and with
    `drop_near_duplicates` left out of the scored prompts too (they stay out of training either way).

    `in_source` > 0 turns the fold into its in-distribution control: that share of the `left_out` source (a fixed
    split, the same for every seed) trains with the other sources and only the rest is evaluated.
    """
    if not 0.0 <= in_source < 1.0:
        raise ValueError(f"`in_source` must be in [0, 1) (0 = the source left out whole), got {in_source!r}.")
    names = group_names(harmful)
    offsets, start = {}, 0
    for name in names:
        offsets[name] = start
        start += len(groups[name])

    def indexed(name: str) -> list[dict[str, Any]]:
        return [{**r, "_index": offsets[name] + i} for i, r in enumerate(groups[name])]

    eval_names = [left_out, *BENIGN_HELD]
    own_train, own_eval = [], indexed(left_out)
    if in_source:
        scored = round((1.0 - in_source) * len(own_eval))
        if not 0 < scored < len(own_eval):
            raise ValueError(f"`in_source`={in_source!r} leaves {len(own_eval) - scored} of {left_out!r}'s "
                             f"{len(own_eval)} prompts to train on and {scored} to score; choose a share that leaves "
                             "both non-empty.")  # fmt: skip
        own_train, own_eval = split_records(own_eval, held_out=scored, seed=SPLIT_SEED)
    eval_index = {name: [r["_index"] for r in indexed(name)] for name in BENIGN_HELD}
    eval_index[left_out] = [r["_index"] for r in own_eval]
    eval_records = [r for name in eval_names for r in (own_eval if name == left_out else groups[name])]
    held = {normalise_prompt(record_text(r)) for r in eval_records}
    harm = [r for name in names if name not in BENIGN_TRAIN + BENIGN_HELD and name != left_out for r in indexed(name)]
    harm += own_train
    benign = [r for name in BENIGN_TRAIN for r in indexed(name)]
    fit_benign, val = split_records(benign, held_out=val_fraction, seed=seed)
    train = harm + fit_benign
    kept_train = [r for r in train if normalise_prompt(record_text(r)) not in held]
    kept_val = [r for r in val if normalise_prompt(record_text(r)) not in held]
    check_disjoint(kept_train + kept_val, eval_records, train_name=f"training pool without {left_out}",
                   eval_name=f"held-out ({left_out} + benign)")  # fmt: skip
    same_label = [r for r in kept_train if r["label"] == "unsafe"]  # look-alikes of the other label are by design
    close = {i for i, _, _ in near_duplicates(same_label, own_eval)}
    if drop_near_duplicates:
        eval_index[left_out] = [r["_index"] for i, r in enumerate(own_eval) if i not in close]
    return {
        "train": [r["_index"] for r in kept_train],
        "val": [r["_index"] for r in kept_val],
        "eval": {name: eval_index[name] for name in eval_names},
        "dropped_overlap": len(train) + len(val) - len(kept_train) - len(kept_val),
        "near_duplicates": len(close),
    }


def not_templated(record: dict[str, Any]) -> bool:
    """Every training record may be rephrased (harmful and benign alike) except a jailbreak-template wrapping."""
    return record.get("augmented") != "template"


def augment_fold(
    groups: dict[str, list[dict[str, Any]]],
    fold: dict[str, Any],
    left_out: str,
    share: float,
    seed: int,
    harmful: list[str] | None = None,
) -> tuple[list[dict[str, Any]], int]:
    """Rephrased copies of `share` of the fold's training records, and how many were dropped as overlap.

    Benign look-alikes are rephrased as well as harmful prompts, so phrasing alone cannot separate the classes.
    Copies equal to a validation or held-out prompt are dropped; then `check_disjoint` guards the rest.
    """
    records = [r for name in group_names(harmful) for r in groups[name]]
    train = [records[i] for i in fold["train"]]
    copies = augment_phrasing(train, share=share, seed=seed, rewritable=not_templated)[len(train) :]
    eval_records = [records[i] for index in fold["eval"].values() for i in index]
    blocked = {normalise_prompt(record_text(r)) for r in eval_records + [records[i] for i in fold["val"]]}
    kept = [{"prompt": r["prompt"], "label": r["label"]} for r in copies
            if normalise_prompt(record_text(r)) not in blocked]  # fmt: skip
    check_disjoint(kept, eval_records, train_name=f"rephrased training copies without {left_out}",
                   eval_name=f"held-out ({left_out} + benign)")  # fmt: skip
    return kept, len(copies) - len(kept)


def fold_metrics(
    scores: torch.Tensor, fold: dict[str, Any], left_out: str, fpr: float, categories: list[Any] | None = None
) -> dict[str, Any]:
    """AUROC, recall and FPRs of one fold from the scores of every prompt (global indices).

    With `categories` (one per prompt, global order; None = uncategorised), `recall_by_category` gives the recall at
    the calibrated threshold within each category of the left-out source: which kinds of harm transfer.
    """
    pick = {name: scores[torch.tensor(index, dtype=torch.long)] for name, index in fold["eval"].items()}
    harmful = pick[left_out]
    benign = torch.cat([pick[name] for name in BENIGN_HELD])
    threshold = threshold_at_fpr(scores[torch.tensor(fold["val"])], fpr)
    by_category: dict[str, list[int]] = {}
    for i in fold["eval"][left_out] if categories is not None else []:
        if categories[i] is not None:
            by_category.setdefault(str(categories[i]), []).append(i)

    def area(negative: torch.Tensor) -> float:
        value = auroc(torch.cat([harmful, negative]), [1] * len(harmful) + [0] * len(negative))
        return float("nan") if value is None else value

    labels = [1] * len(harmful) + [0] * len(benign)
    fprs, tprs = roc_curve(torch.cat([harmful, benign]).tolist(), labels)
    return {
        "auroc": area(benign),
        "auroc_vs_xstest_safe_b": area(pick["xstest_safe_b"]),
        "auroc_vs_hard_negatives_eval": area(pick["hard_negatives_eval"]),
        "auroc_vs_alpaca_held": area(pick["alpaca_held"]),
        "threshold": threshold,
        "recall": flag_rate(harmful, threshold),
        "recall_shipped": flag_rate(harmful, SHIPPED_THRESHOLD, inclusive=True),
        "fpr_xstest_safe_b": flag_rate(pick["xstest_safe_b"], threshold),
        "fpr_hard_negatives_eval": flag_rate(pick["hard_negatives_eval"], threshold),
        "fpr_alpaca_held": flag_rate(pick["alpaca_held"], threshold),
        "fpr_xstest_safe_b_shipped": flag_rate(pick["xstest_safe_b"], SHIPPED_THRESHOLD, inclusive=True),
        "fpr_validation": flag_rate(scores[torch.tensor(fold["val"])], threshold),
        "recall_by_category": {
            c: flag_rate(scores[torch.tensor(i, dtype=torch.long)], threshold) for c, i in sorted(by_category.items())
        },
        "n_by_category": {c: len(i) for c, i in sorted(by_category.items())},
        "roc": {"fpr": [round(x, 5) for x in fprs], "tpr": [round(y, 5) for y in tprs]},
        "n": {
            "left_out": len(harmful),
            "held_benign": len(benign),
            "train": len(fold["train"]),
            "val": len(fold["val"]),
            "dropped_overlap": fold["dropped_overlap"],
            "near_duplicates": fold["near_duplicates"],
        },  # fmt: skip
    }


def run_protocol(
    model: Any,
    processor: Any,
    groups: dict[str, list[dict[str, Any]]],
    *,
    config: Any,
    seeds: list[int],
    fit_kwargs: dict[str, Any] | None = None,
    fpr: float = 0.05,
    store: StateStore | None = None,
    model_name: str = "model",
    augment_share: float = 0.0,
    fit_mode: str = "gate",
    progress: bool = False,
    harmful: list[str] | None = None,
    left_out: list[str] | None = None,
    lora_args: dict[str, Any] | None = None,
    gate_lr: float | None = None,
    in_source: float = 0.0,
    drop_near_duplicates: bool = False,
) -> dict[str, Any]:
    """Run the LOSO protocol; returns `{"folds": [...], "summary": {source: {metric: summary}}, "cache": ...}`.

    Args:
        model, processor: the frozen backbone (attached and detached again, once per seed).
        groups (`dict`): records of every group in `group_names(harmful)`.
        config (`GateConfig`): the gate (its `layer` and `safety_prompt` decide the prompt states).
        seeds (`list[int]`): one gate initialisation, validation split and batch order per seed.
        fit_kwargs (`dict`): passed to `fit_gate` (`epochs`, `lr`, ...); `seed` is set per seed.
        fpr (`float`): target false-positive rate of the calibrated threshold on the benign validation split.
        store (`StateStore`): on-disk prompt-state cache (default: in memory only).
        augment_share (`float`): share of each fold's training records given a rephrased copy (`augment_fold`,
            seeded with the fold's seed); 0 = no augmentation.
        fit_mode (`str`): what each fold fits, a key of `FIT_MODES`: `"gate"` (the safety attention, token rows as
            attached), `"rows"` (the two token rows, gate held constant) or `"both"`. Every fold starts from the
            seed's freshly attached gate and rows.
        harmful (`list[str] | None`): the harmful groups, each left out in turn and trained on in the other folds
            (default `HARMFUL`).
        left_out (`list[str] | None`): run only these folds (default: every harmful group).
        lora_args (`dict | None`): after the gate fit, train LoRA, gate and token rows on the fold's training
            prompts with `safegate.train(verdict_only=True)` and these `TrainingArguments` fields (`max_steps`, ...);
            every fold starts from the seed's fresh adapter. None = frozen states only.
        gate_lr (`float | None`): learning rate of gate and token rows in that phase (`safegate.train`'s).
        in_source (`float`): the in-distribution control: train on this share of each fold's own source too (a fixed
            split) and evaluate on the rest (`fold_split`); 0 = leave the source out whole (the protocol).
        drop_near_duplicates (`bool`): score no left-out prompt with a harmful near-duplicate in training.
    """
    harmful = list(HARMFUL if harmful is None else harmful)
    check_groups(groups, harmful)
    folds_run = list(harmful if left_out is None else left_out)
    if not folds_run or any(name not in harmful for name in folds_run):
        raise ValueError(f"`left_out` must name harmful groups of {harmful}, got {left_out!r}.")
    if lora_args is not None and fit_mode != "gate":
        raise ValueError(f"`lora_args` trains gate, rows and LoRA after the gate fit; use fit_mode='gate', got "
                         f"{fit_mode!r}.")  # fmt: skip
    if fit_mode not in FIT_MODES:
        raise ValueError(f"`fit_mode` must be one of {sorted(FIT_MODES)}, got {fit_mode!r}.")
    if not seeds:
        raise ValueError("`seeds` must name at least one seed.")
    if not 0.0 <= augment_share <= 1.0:
        raise ValueError(f"`augment_share` must be in [0, 1] (0 = no augmentation), got {augment_share!r}.")
    store = store or StateStore(None)
    names = group_names(harmful)
    torch.manual_seed(seeds[0])
    gated = attach(model, processor, copy.deepcopy(config))
    caches = []
    for name in names:
        caches.append(store.get(gated, groups[name], model_name, progress=progress))
    all_cache = concat_caches(caches)
    cache_seconds = all_cache.seconds
    model = gated.detach()
    records = [r for name in names for r in groups[name]]
    categories = [r.get("category") for r in records]
    folds = []
    steps = [(seed, name) for seed in seeds for name in folds_run]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(steps), desc="LOSO fits")
    for seed in seeds:
        torch.manual_seed(seed)
        gated = attach(model, processor, copy.deepcopy(config))
        initial = copy.deepcopy(gated.gate.state_dict())
        rows = token_row_layer(gated).trainable_tokens_delta["default"]
        initial_rows = rows.detach().clone()
        initial_lora = {n: p.detach().clone() for n, p in gated.named_parameters() if "lora_" in n}
        for source in folds_run:
            gated.gate.load_state_dict(initial)
            with torch.no_grad():
                rows.copy_(initial_rows)
                for n, p in gated.named_parameters():
                    if n in initial_lora:
                        p.copy_(initial_lora[n])
            fold = fold_split(groups, source, seed, harmful=harmful, in_source=in_source,
                              drop_near_duplicates=drop_near_duplicates)  # fmt: skip
            train_cache = subset_cache(all_cache, fold["train"])
            copies, dropped = (
                augment_fold(groups, fold, source, augment_share, seed, harmful) if augment_share else ([], 0)
            )
            if copies:
                train_cache = concat_caches([train_cache, store.get(gated, copies, model_name)])
            stats = fit_gate(gated, train_cache, **{**(fit_kwargs or {}), **FIT_MODES[fit_mode], "seed": seed})
            fitted_rows = head_rows(gated) if FIT_MODES[fit_mode]["train_token_rows"] else None
            if lora_args is not None:
                train_records = [records[i] for i in fold["train"]] + copies
                stats["lora"] = train_verdict(gated, train_records, lora_args, seed, gate_lr, fit_kwargs)
                scores = adapted_scores(gated, records, fold)
            else:
                scores = cached_scores(gated, all_cache, fitted_rows).double()
            row = {"seed": seed, "left_out": source, **fold_metrics(scores, fold, source, fpr, categories)}
            row["n"].update(augmented=len(copies), dropped_augmented=dropped)
            row["fit"] = {k: stats.get(k) for k in ("train_auroc", "train_accuracy", "final_loss", "fit_seconds")}
            row["fit"].update({k: v for k, v in stats.items() if k in ("diverged", "retries", "best_epoch", "lora")})
            folds.append(row)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(left_out=source, auroc=f"{row['auroc']:.3f}")
        model = gated.detach()
    if bar is not None:
        bar.close()
    summary = {
        name: {m: summarise([f[m] for f in folds if f["left_out"] == name]) for m in METRICS} for name in folds_run
    }
    by_category = {
        name: {c: summarise([f["recall_by_category"].get(c, float("nan")) for f in folds if f["left_out"] == name])
               for c in sorted({c for f in folds if f["left_out"] == name for c in f["recall_by_category"]})}
        for name in folds_run
    }  # fmt: skip
    summary["mean over sources"] = {
        m: summarise([summary[s][m]["mean"] for s in folds_run]) for m in METRICS
    }  # spread here = across sources
    return {
        "folds": folds,
        "summary": summary,
        "counts": {name: len(groups[name]) for name in names},
        "recall_by_category": by_category,
        "harmful": harmful,
        "left_out": folds_run,
        "lora_args": lora_args,
        "augment_share": augment_share,
        "fit_mode": fit_mode,
        "in_source": in_source,
        "drop_near_duplicates": drop_near_duplicates,
        "cache": {"hits": store.hits, "misses": store.misses, "seconds": cache_seconds},
    }
