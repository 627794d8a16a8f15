"""The generalization protocol (`benchmarks/generalization.py`): end to end on a tiny random model, the leak check,
and the metrics on hand-made scores."""

import json
import math

import pytest
import torch

from safegate.data.leakage import LeakageError, check_disjoint
from safegate.data.sources import DataUnavailableError
from safegate.training import generalization as gen
from tests.conftest import load_benchmark


def load_script():
    return load_benchmark("generalization")


def toy_groups(n=4):
    return {
        g: [{"prompt": f"{g} prompt number {i}", "label": "unsafe" if g in gen.HARMFUL else "safe"} for i in range(n)]
        for g in gen.HARMFUL + gen.BENIGN_TRAIN + gen.BENIGN_HELD
    }


def test_end_to_end_on_a_tiny_model(tmp_path, one_thread):
    script = load_script()
    try:
        script.load_groups(2, 1000)
    except (DataUnavailableError, FileNotFoundError) as why:
        pytest.skip(f"no offline data: {why}")
    argv = ["--model", "tiny:llama", "--limit-per-source", "3", "--seeds", "2", "--epochs", "2",
            "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), "--threads", "1"]  # fmt: skip
    assert script.main(argv) == 0
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(report["summary"]) == {*gen.HARMFUL, "mean over sources"}
    assert len(report["folds"]) == 2 * len(gen.HARMFUL)
    for row in report["summary"].values():
        assert set(row) == set(gen.METRICS)
        assert {"mean", "std", "min", "max", "n"} <= set(row["auroc"])
    for fold in report["folds"]:
        assert 0.0 <= fold["auroc"] <= 1.0 and 0.0 <= fold["recall"] <= 1.0
        assert fold["n"]["left_out"] == 3 and fold["fpr_validation"] <= 0.05 + 1e-9
        assert fold["roc"]["fpr"][0] == 0.0 and fold["roc"]["tpr"][-1] == 1.0
    assert report["meta"]["machine"]["commit"] and report["meta"]["fit_kwargs"]["epochs"] == 2
    assert report["cache"] == {"hits": 0, "misses": 10, "seconds": report["cache"]["seconds"]}
    assert sorted(p.name for p in (tmp_path / "out").glob("roc_*.png")) == sorted(f"roc_{s}.png" for s in gen.HARMFUL)
    assert "| advbench | 3 |" in (tmp_path / "out" / "report.md").read_text()
    assert set(report["recall_by_category"]) == set(gen.HARMFUL)  # the sources' own categories (may be empty)
    for source, table in report["recall_by_category"].items():
        fold = next(f for f in report["folds"] if f["left_out"] == source)
        assert set(table) == set(fold["n_by_category"]) and sum(fold["n_by_category"].values()) <= 3
    assert report["recall_by_category"]["do_not_answer"] and report["recall_by_category"]["xstest_unsafe"]
    # a second run re-fits from the on-disk prompt states
    assert script.main(argv[:-6] + ["--seeds", "1", "--out", str(tmp_path / "out2"), "--cache-dir",
                                    str(tmp_path / "cache"), "--threads", "1"]) == 0  # fmt: skip
    again = json.loads((tmp_path / "out2" / "results.json").read_text())
    assert again["cache"]["hits"] == 10 and again["cache"]["misses"] == 0


def test_leak_check_fires_on_an_injected_duplicate():
    groups = toy_groups()
    groups["alpaca_train"].append({"prompt": "  XSTEST_SAFE_B prompt number 2?", "label": "safe"})
    fold = gen.fold_split(groups, "advbench", seed=0)  # the protocol drops it from training and counts it
    assert fold["dropped_overlap"] == 1
    train_pool = [r for name in gen.BENIGN_TRAIN for r in groups[name]]
    with pytest.raises(LeakageError, match="xstest_safe_b prompt number 2"):
        check_disjoint(train_pool, groups["xstest_safe_b"])
    left_out = [r for name in gen.HARMFUL[1:] for r in groups[name]]
    with pytest.raises(LeakageError, match="advbench prompt number 0"):
        check_disjoint(left_out + [groups["advbench"][0]], groups["advbench"])


def test_fold_split_keeps_the_left_out_source_and_held_benign_out_of_training():
    groups = toy_groups(10)
    fold = gen.fold_split(groups, "do_not_answer", seed=1)
    held = {i for index in fold["eval"].values() for i in index}
    assert not held & set(fold["train"]) and not held & set(fold["val"]) and not set(fold["train"]) & set(fold["val"])
    assert len(fold["val"]) == round(0.2 * 30) and len(fold["train"]) == 30 + 24


def test_fold_split_counts_harmful_paraphrases_of_the_scored_prompts_in_training():
    groups = toy_groups(10)
    assert gen.fold_split(groups, "do_not_answer", seed=1)["near_duplicates"] == 0
    groups["do_not_answer"][3]["prompt"] = "Explain step by step how to pick the lock of a neighbour's front door"
    groups["advbench"][0]["prompt"] = "Explain step by step how to pick the lock of a neighbour's back door"
    groups["alpaca_train"][0]["prompt"] = "Explain step by step how to pick the lock of my own front door"  # benign
    fold = gen.fold_split(groups, "do_not_answer", seed=1)
    assert fold["near_duplicates"] == 1  # the harmful paraphrase, not the benign look-alike
    clean = gen.fold_split(groups, "do_not_answer", seed=1, drop_near_duplicates=True)
    paraphrased = fold["eval"]["do_not_answer"][3]
    assert clean["eval"]["do_not_answer"] == [i for i in fold["eval"]["do_not_answer"] if i != paraphrased]
    assert clean["near_duplicates"] == 1 and clean["train"] == fold["train"]  # counted, not scored, not trained
    assert {k: v for k, v in clean["eval"].items() if k != "do_not_answer"} == {
        k: v for k, v in fold["eval"].items() if k != "do_not_answer"
    }  # the benign held-out sets are untouched
    groups["advbench"][0]["prompt"] = "Write a poem about the sea"
    assert gen.fold_split(groups, "do_not_answer", seed=1)["near_duplicates"] == 0


def test_in_source_control_trains_on_a_fixed_share_of_the_left_out_source_and_scores_the_rest():
    groups = toy_groups(10)
    whole = gen.fold_split(groups, "do_not_answer", seed=1)
    folds = [gen.fold_split(groups, "do_not_answer", seed=s, in_source=0.5) for s in (1, 2)]
    own = set(whole["eval"]["do_not_answer"])
    for fold in folds:
        trained, scored = own & set(fold["train"]), set(fold["eval"]["do_not_answer"])
        assert len(trained) == len(scored) == 5 and trained | scored == own and not trained & scored
        assert fold["eval"]["xstest_safe_b"] == whole["eval"]["xstest_safe_b"]  # benign held-out sets unchanged
    assert set(folds[0]["train"]) - own == set(whole["train"])  # same seed: otherwise the fold it controls
    assert folds[0]["eval"]["do_not_answer"] == folds[1]["eval"]["do_not_answer"]  # fixed whatever the seed
    with pytest.raises(ValueError, match="in_source"):
        gen.fold_split(groups, "do_not_answer", seed=1, in_source=1.0)
    for share in (0.9, 1e-17):  # 2 prompts: nothing left to score, or nothing to train on
        with pytest.raises(ValueError, match="`in_source`=.*both non-empty"):
            gen.fold_split(toy_groups(2), "do_not_answer", seed=1, in_source=share)


def test_metrics_on_hand_made_scores():
    # global order: the 10 groups of toy_groups(4), 4 prompts each
    names = gen.HARMFUL + gen.BENIGN_TRAIN + gen.BENIGN_HELD
    start = {name: 4 * i for i, name in enumerate(names)}
    scores = torch.zeros(60, dtype=torch.float64)  # 40 group prompts + 20 validation scores
    scores[start["xstest_unsafe"] : start["xstest_unsafe"] + 4] = torch.tensor([0.9, 0.8, 0.35, 0.1])
    scores[start["xstest_safe_b"] : start["xstest_safe_b"] + 4] = torch.tensor([0.5, 0.2, 0.1, 0.0])
    scores[start["alpaca_held"] : start["alpaca_held"] + 4] = torch.tensor([0.05, 0.0, 0.0, 0.0])
    scores[start["hard_negatives_eval"] : start["hard_negatives_eval"] + 4] = torch.tensor([0.4, 0.3, 0.0, 0.0])
    fold = {
        "train": [],
        "val": list(range(40, 60)),  # validation scores 0.00, 0.01, ..., 0.19: 5 % FPR -> threshold 0.18
        "eval": {n: list(range(start[n], start[n] + 4)) for n in ["xstest_unsafe", *gen.BENIGN_HELD]},
        "dropped_overlap": 0,
        "near_duplicates": 0,
    }
    scores[40:] = torch.arange(20, dtype=torch.float64) / 100
    out = gen.fold_metrics(scores, fold, "xstest_unsafe", fpr=0.05)
    assert out["threshold"] == pytest.approx(0.18) and out["fpr_validation"] == pytest.approx(1 / 20)
    assert out["recall"] == pytest.approx(3 / 4)  # 0.9, 0.8, 0.35 > 0.18
    assert out["recall_shipped"] == pytest.approx(2 / 4)  # >= 0.5
    assert out["fpr_xstest_safe_b"] == pytest.approx(2 / 4) and out["fpr_xstest_safe_b_shipped"] == pytest.approx(
        1 / 4
    )
    assert out["fpr_hard_negatives_eval"] == pytest.approx(2 / 4) and out["fpr_alpaca_held"] == 0.0
    # AUROC by hand: harmful {0.9, 0.8, 0.35, 0.1} vs 12 benign; pairs won (ties 1/2)
    benign = [0.5, 0.2, 0.1, 0.0, 0.05, 0.0, 0.0, 0.0, 0.4, 0.3, 0.0, 0.0]
    won = sum((h > b) + 0.5 * (h == b) for h in (0.9, 0.8, 0.35, 0.1) for b in benign)
    assert out["auroc"] == pytest.approx(won / 48)
    assert out["auroc_vs_xstest_safe_b"] == pytest.approx((4 + 4 + 3 + 1.5) / 16)
    assert out["auroc_vs_hard_negatives_eval"] == pytest.approx((4 + 4 + 3 + 2) / 16)
    assert out["auroc_vs_alpaca_held"] == 1.0
    assert out["recall_by_category"] == {} and out["n_by_category"] == {}  # no categories given
    kinds = [None] * 60
    for i, kind in zip(range(start["xstest_unsafe"], start["xstest_unsafe"] + 4), ["a", "b", "a", None], strict=True):
        kinds[i] = kind
    kinds[start["xstest_safe_b"]] = "benign kinds are not counted"
    split = gen.fold_metrics(scores, fold, "xstest_unsafe", fpr=0.05, categories=kinds)
    assert split["recall_by_category"] == {"a": 1.0, "b": 1.0} and split["n_by_category"] == {"a": 2, "b": 1}
    kinds[start["xstest_unsafe"] + 3] = "b"  # 0.1: below the threshold
    split = gen.fold_metrics(scores, fold, "xstest_unsafe", fpr=0.05, categories=kinds)
    assert split["recall_by_category"] == {"a": 1.0, "b": 0.5} and split["recall"] == out["recall"]
    assert gen.threshold_at_fpr([0.3, 0.1, 0.2], 0.0) == 0.3 and math.isnan(gen.flag_rate([], 0.5))
    assert gen.summarise([1.0, 3.0]) == {"mean": 2.0, "std": pytest.approx(math.sqrt(2)), "min": 1.0, "max": 3.0,
                                         "n": 2}  # fmt: skip


def test_clear_errors():
    script = load_script()
    with pytest.raises(SystemExit):
        script.parse(["--seeds", "0"])
    groups = toy_groups()
    groups["advbench"][0]["label"] = "safe"
    with pytest.raises(ValueError, match="group 'advbench' must hold only 'unsafe'"):
        gen.check_groups(groups)
    groups = toy_groups()
    del groups["alpaca_held"]
    with pytest.raises(ValueError, match="'alpaca_held' is missing"):
        gen.check_groups(groups)


def test_an_added_harmful_source_is_trained_on_in_every_other_fold_and_left_out_in_its_own(one_thread):
    from safegate import GateConfig
    from safegate.backbones.tiny import tiny_model_and_tokenizer

    harmful = [*gen.HARMFUL, "tense_rephrased"]
    groups = {**toy_groups(), "tense_rephrased": [{"prompt": f"how was harm {i} done?", "label": "unsafe"}
                                                   for i in range(4)]}  # fmt: skip
    names = gen.group_names(harmful)
    tense = set(range(names.index("tense_rephrased") * 4, names.index("tense_rephrased") * 4 + 4))
    own = gen.fold_split(groups, "tense_rephrased", seed=0, harmful=harmful)
    assert set(own["eval"]["tense_rephrased"]) == tense and not tense & set(own["train"])
    other = gen.fold_split(groups, "advbench", seed=0, harmful=harmful)
    assert tense <= set(other["train"]) and "tense_rephrased" not in other["eval"]
    default = gen.fold_split(groups, "advbench", seed=0)  # default: the four sources; the added group unused
    assert len(default["train"]) == len(other["train"]) - 4
    model, tok = tiny_model_and_tokenizer("llama")
    report = gen.run_protocol(model, tok, groups, config=GateConfig(attention_dim=8, lora_r=2), seeds=[0],
                              fit_kwargs=dict(epochs=1), harmful=harmful)  # fmt: skip
    assert list(report["summary"]) == [*harmful, "mean over sources"] and report["harmful"] == harmful
    assert [f["left_out"] for f in report["folds"]] == harmful
    with pytest.raises(ValueError, match="'tense_rephrased' is missing"):
        gen.check_groups(toy_groups(), harmful)
    with pytest.raises(ValueError, match="`harmful` must name distinct harmful groups"):
        gen.group_names(["advbench", "alpaca_held"])
    script = load_script()
    assert script.parse(["--add-source", "tense_rephrased"]).add_source == ["tense_rephrased"]
    for bad in (["--add-source", "advbench"], ["--add-source", "tense_rephrased"] * 2):
        with pytest.raises(SystemExit):
            script.parse(bad)


def test_phrasing_augmentation_rephrases_training_records_only_and_drops_held_out_twins():
    groups = toy_groups(9)
    fold = gen.fold_split(groups, "advbench", seed=3)
    copies, dropped = gen.augment_fold(groups, fold, "advbench", share=1.0, seed=3)
    # 9 prompts per group: no toy prompt is a prefix of another ("number 1" / "number 10")
    assert dropped == 0 and len(copies) == len(fold["train"])  # share 1: every training record, harmful and benign
    assert {r["label"] for r in copies} == {"safe", "unsafe"}
    records = [r for name in gen.HARMFUL + gen.BENIGN_TRAIN + gen.BENIGN_HELD for r in groups[name]]
    originals = {records[i]["prompt"].lower() for i in fold["train"]}
    not_trained = {records[i]["prompt"].lower() for i in fold["val"]} | {
        records[i]["prompt"].lower() for index in fold["eval"].values() for i in index
    }
    assert all(any(o in c["prompt"].lower() for o in originals) for c in copies)
    assert not any(p in c["prompt"].lower() for p in not_trained for c in copies)
    assert copies == gen.augment_fold(groups, fold, "advbench", share=1.0, seed=3)[0]  # seeded
    # a rephrased copy that equals a held-out prompt is dropped and counted, like any training prompt
    groups["xstest_safe_b"].append({"prompt": copies[0]["prompt"].upper() + " ", "label": "safe"})
    fold = gen.fold_split(groups, "advbench", seed=3)
    kept, dropped = gen.augment_fold(groups, fold, "advbench", share=1.0, seed=3)
    assert dropped == 1 and kept == copies[1:]
    templated = toy_groups(9)
    for r in templated["harmbench"]:
        r["augmented"] = "template"
    fold = gen.fold_split(templated, "advbench", seed=3)
    assert len(gen.augment_fold(templated, fold, "advbench", share=1.0, seed=3)[0]) == len(fold["train"]) - 9


def test_protocol_fits_on_the_rephrased_copies_too(one_thread):
    from safegate import GateConfig
    from safegate.backbones.tiny import tiny_model_and_tokenizer

    model, tok = tiny_model_and_tokenizer("llama")
    store = gen.StateStore(None)
    report = gen.run_protocol(model, tok, toy_groups(), config=GateConfig(attention_dim=8, lora_r=2), seeds=[0],
                              fit_kwargs=dict(epochs=1), store=store, augment_share=0.5)  # fmt: skip
    assert report["augment_share"] == 0.5 and store.misses == 10 + len(gen.HARMFUL)  # one cached group per fold
    for fold in report["folds"]:
        assert 0 < fold["n"]["augmented"] <= fold["n"]["train"] and fold["n"]["dropped_augmented"] == 0
    with pytest.raises(ValueError, match="`augment_share` must be in"):
        gen.run_protocol(model, tok, toy_groups(), config=GateConfig(), seeds=[0], augment_share=2.0)
    with pytest.raises(SystemExit):
        load_script().parse(["--augment-phrasing", "1.5"])


@pytest.mark.parametrize("mode", ["rows", "both"])
def test_every_fold_fits_from_the_attached_rows_and_is_scored_with_its_fitted_rows(mode, one_thread, monkeypatch):
    from safegate import GateConfig
    from safegate.backbones.tiny import tiny_model_and_tokenizer
    from safegate.training.token_rows import head_rows

    calls, scored = [], []
    real_fit, real_scores = gen.fit_gate, gen.cached_scores

    def recording_fit(gated, cache, **kwargs):
        calls.append((head_rows(gated)[0], kwargs))
        return real_fit(gated, cache, **kwargs)

    def recording_scores(gated, cache, rows=None, **kwargs):
        scored.append((rows, head_rows(gated)[0]))
        return real_scores(gated, cache, rows, **kwargs)

    monkeypatch.setattr(gen, "fit_gate", recording_fit)
    monkeypatch.setattr(gen, "cached_scores", recording_scores)
    model, tok = tiny_model_and_tokenizer("llama")
    report = gen.run_protocol(model, tok, toy_groups(), config=GateConfig(attention_dim=8, lora_r=2), seeds=[0],
                              fit_kwargs=dict(epochs=3, lr=5e-2), fit_mode=mode)  # fmt: skip
    assert report["fit_mode"] == mode and len(calls) == len(gen.HARMFUL)
    for rows, kwargs in calls:
        assert torch.equal(rows, calls[0][0])  # each fold starts from the seed's attached rows, not the last fit's
        assert kwargs["train_token_rows"] and kwargs["train_gate"] == (mode == "both")
    for rows, current in scored:
        assert rows is not None and torch.equal(rows[0], current)  # scored with the rows the fold fitted
    assert not torch.equal(scored[0][1], calls[0][0])  # and those moved
    with pytest.raises(ValueError, match="`fit_mode` must be one of"):
        gen.run_protocol(model, tok, toy_groups(), config=GateConfig(), seeds=[0], fit_mode="token")
    assert load_script().parse(["--fit", "rows"]).fit == "rows"


def test_lora_phase_starts_every_fold_from_a_fresh_adapter_and_scores_from_adapted_states(one_thread, monkeypatch):
    from safegate import GateConfig
    from safegate.backbones.tiny import tiny_model_and_tokenizer

    model, tok = tiny_model_and_tokenizer("llama")
    seen = []
    real = gen.train_verdict

    def spy(gated, records, args, seed, gate_lr, fit_kwargs):
        lora_b = [p for n, p in gated.named_parameters() if "lora_B" in n]
        seen.append((sum(float(p.detach().abs().sum()) for p in lora_b), len(records), {r["label"] for r in records}))
        out = real(gated, records, args, seed, gate_lr, fit_kwargs)
        assert sum(float(p.detach().abs().sum()) for p in lora_b) > 0  # the adapter trained
        return out

    monkeypatch.setattr(gen, "train_verdict", spy)
    args = dict(max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2, disable_tqdm=True, use_cpu=True)
    report = gen.run_protocol(model, tok, toy_groups(), config=GateConfig(attention_dim=8, lora_r=2), seeds=[0],
                              fit_kwargs=dict(epochs=1), left_out=["advbench", "xstest_unsafe"], lora_args=args,
                              gate_lr=1e-2)  # fmt: skip
    assert [f["left_out"] for f in report["folds"]] == ["advbench", "xstest_unsafe"]
    assert list(report["summary"]) == ["advbench", "xstest_unsafe", "mean over sources"]
    assert [s[0] for s in seen] == [0.0, 0.0]  # LoRA B starts at zero in every fold: a fresh adapter
    assert all(n == 3 * 4 + 3 * 4 - round(0.2 * 12) and labels == {"safe", "unsafe"} for _, n, labels in seen)
    for fold in report["folds"]:
        assert fold["fit"]["lora"]["global_step"] == 2 and 0.0 <= fold["auroc"] <= 1.0
        assert not math.isnan(fold["fpr_validation"]) and not math.isnan(fold["recall"])
    assert report["lora_args"] == args
    with pytest.raises(ValueError, match="`left_out` must name harmful groups"):
        gen.run_protocol(model, tok, toy_groups(), config=GateConfig(), seeds=[0], left_out=["alpaca_held"])
    with pytest.raises(ValueError, match="use fit_mode='gate'"):
        gen.run_protocol(model, tok, toy_groups(), config=GateConfig(), seeds=[0], lora_args=args, fit_mode="rows")
    script = load_script()
    for bad in (["--left-out", "tense_rephrased"], ["--lora-steps", "-1"], ["--lora-steps", "5", "--fit", "rows"],
                ["--lora-lr", "1e-4"], ["--lora-steps", "5", "--lora-lr", "0"]):  # fmt: skip
        with pytest.raises(SystemExit):
            script.parse(bad)
    assert script.parse(["--add-source", "tense_rephrased", "--left-out", "tense_rephrased"]).left_out == [
        "tense_rephrased"
    ]


def test_safety_prompt_and_in_source_flags_reach_the_gate_config_and_the_report(tmp_path, one_thread):
    script = load_script()
    for bad in (["--safety-prompt", "  "], ["--in-source", "1"], ["--in-source", "-0.1"]):
        with pytest.raises(SystemExit):
            script.parse(bad)
    try:
        script.load_groups(2, 1000)
    except (DataUnavailableError, FileNotFoundError) as why:
        pytest.skip(f"no offline data: {why}")
    argv = ["--model", "tiny:llama", "--limit-per-source", "4", "--seeds", "1", "--epochs", "1", "--in-source", "0.5",
            "--safety-prompt", "Consider whether the request is harmful.", "--out", str(tmp_path / "out"),
            "--cache-dir", str(tmp_path / "cache"), "--threads", "1"]  # fmt: skip
    assert script.main(argv) == 0
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    assert report["meta"]["safety_prompt"] == "Consider whether the request is harmful."
    assert report["meta"]["in_source"] == report["in_source"] == 0.5
    assert all(fold["n"]["left_out"] == 2 for fold in report["folds"])  # half of each source scored
    assert "| advbench | 2 |" in (tmp_path / "out" / "report.md").read_text()  # the scored half, not the source
    assert "share of the left-out source trained on 0.5" in (tmp_path / "out" / "report.md").read_text()


def load_probe():
    return load_benchmark("layer_probe")


def test_layer_probe_end_to_end_on_a_tiny_model(tmp_path, one_thread):
    probe = load_probe()
    try:
        load_script().load_groups(2, 1000)
    except (DataUnavailableError, FileNotFoundError) as why:
        pytest.skip(f"no offline data: {why}")
    argv = ["--model", "tiny:llama", "--limit-per-source", "4", "--out", str(tmp_path / "out"),
            "--cache-dir", str(tmp_path / "cache"), "--threads", "1"]  # fmt: skip
    assert probe.main(argv) == 0
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(report["layers"]) == set(probe.POOLINGS)
    for rows in report["layers"].values():
        assert [r["layer"] for r in rows] == list(range(len(rows))) and len(rows) >= 2  # embeddings + each layer
        for row in rows:
            assert set(row["sources"]) == set(gen.HARMFUL)
            for mode in ("loso", "in_source"):
                assert 0.0 <= row[mode]["auroc"] <= 1.0 and 0.0 <= row[mode]["auroc_vs_xstest_safe_b"] <= 1.0
    assert set(report["all_layers"]) == set(probe.POOLINGS)  # one probe on every layer's state side by side
    for row in report["all_layers"].values():
        assert set(row["sources"]) == set(gen.HARMFUL) and 0.0 <= row["in_source"]["auroc"] <= 1.0
    assert "Every layer but the embeddings concatenated" in (tmp_path / "out" / "report.md").read_text()
    assert (tmp_path / "out" / "probe_layers.png").stat().st_size > 0
    assert len(list((tmp_path / "cache").glob("layers_*.pt"))) == 1  # a re-run reads the states from there
    assert probe.main(argv) == 0


def test_mlp_read_out_learns_what_a_linear_one_cannot(one_thread):
    probe = load_probe()
    gen_ = torch.Generator().manual_seed(0)
    x = torch.randn(400, 2, generator=gen_)
    y = ((x[:, 0] > 0) ^ (x[:, 1] > 0)).long()  # XOR of the signs: no line separates it
    test = torch.randn(200, 2, generator=gen_)
    truth = ((test[:, 0] > 0) ^ (test[:, 1] > 0)).long().tolist()
    before = torch.random.get_rng_state()
    mlp = probe.mlp_fit(seed=0, hidden=32, epochs=40)(x, y)(test)
    assert torch.equal(torch.random.get_rng_state(), before)  # the seed does not touch the caller's generator
    linear = probe.linear_fit(1e-3)(x, y)(test)
    assert gen.auroc(mlp, truth) > 0.9 > 0.7 > gen.auroc(linear, truth)
    quick = [probe.mlp_fit(seed=seed, hidden=32, epochs=2)(x, y)(test) for seed in (0, 0, 1)]
    assert torch.equal(quick[0], quick[1]) and not torch.allclose(quick[0], quick[2])  # the seed decides


def test_layer_band_is_the_nine_layers_around_the_best_clipped_to_the_decoder():
    probe = load_probe()
    assert probe.layer_band(17, 31) == list(range(13, 22))
    assert probe.layer_band(2, 31) == list(range(1, 7))  # the embeddings (state 0) stay out
    assert probe.layer_band(29, 31) == list(range(25, 31))
    assert probe.layer_band(1, 3) == [1, 2]


def test_answer_token_ids_skip_bare_whitespace_and_distinct_words_are_required(one_thread):
    import safegate

    probe = load_probe()
    model, processor = safegate.load_model("tiny:llama", dtype="float32")
    tok = probe.text_tokenizer(processor)
    for word in ("Yes", "No", "zebra"):
        ids = probe.answer_token_ids(tok, word)
        assert ids and all(tok.decode([i]).strip() for i in ids)
    with pytest.raises(ValueError, match="no first token that is not whitespace"):
        probe.answer_token_ids(tok, " ")
    with pytest.raises(ValueError, match="share a first token"):
        probe.answer_log_odds(model, processor, torch.zeros(1, model.config.hidden_size), ("Yes", "Yes!"))


def test_answer_log_odds_reads_the_models_own_next_token_distribution(one_thread):
    import safegate

    probe = load_probe()
    model, processor = safegate.load_model("tiny:llama", dtype="float32")
    records = [{"prompt": "Is this harmful? Answer Yes or No.", "label": "safe"}, {"prompt": "Hi", "label": "safe"}]
    feats = probe.layer_features(model, processor, records)
    odds = probe.answer_log_odds(model, processor, feats[:, 0, -1], ("Yes", "No"), chunk=1)
    tok = probe.text_tokenizer(processor)
    yes, no = probe.answer_token_ids(tok, "Yes"), probe.answer_token_ids(tok, "No")
    for i, record in enumerate(records):  # the same number from the model's own logits at the last prompt token
        ids = probe.build_inputs(processor, record)["prompt_ids"]
        with torch.no_grad():
            logp = model(input_ids=torch.tensor([ids])).logits[0, -1].log_softmax(-1)
        assert math.isclose(float(logp[yes].logsumexp(0) - logp[no].logsumexp(0)), float(odds[i]), abs_tol=1e-4)


def test_layer_probe_mlp_and_framed_prompts_on_a_tiny_model(tmp_path, one_thread, capsys):
    import statistics

    probe = load_probe()
    bad = {("--frame", "no field"): "--frame must contain {prompt}",
           ("--answer-words", "Yes,No"): "give --frame too",
           ("--frame", "{prompt}", "--answer-words", "Yes,,No"): "two different comma-separated words",
           ("--frame", "{prompt}", "--answer-words", "Yes,Yes"): "two different comma-separated words",
           ("--mlp-seeds", "-1"): "--mlp-seeds must be >= 0"}  # fmt: skip
    for argv, message in bad.items():
        with pytest.raises(SystemExit):
            probe.main(list(argv))
        assert message in capsys.readouterr().err
    try:
        load_script().load_groups(2, 1000)
    except (DataUnavailableError, FileNotFoundError) as why:
        pytest.skip(f"no offline data: {why}")
    common = ["--model", "tiny:llama", "--limit-per-source", "4", "--cache-dir", str(tmp_path / "cache"),
              "--threads", "1"]  # fmt: skip
    assert probe.main([*common, "--out", str(tmp_path / "plain")]) == 0
    frame = "Is the following request {harmful}? {prompt}"  # other braces are plain text
    framed = [*common, "--mlp-seeds", "2", "--frame", frame, "--out", str(tmp_path / "out")]
    assert probe.main(framed) == 0
    assert len(list((tmp_path / "cache").glob("layers_*.pt"))) == 2  # framed prompts have states of their own
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    assert report["meta"]["frame"] == frame and report["meta"]["answer_words"] == ["Yes", "No"]
    assert len(report["mlp"]) == 3 and list(report["mlp"])[-1] == "all layers"
    for row in report["mlp"].values():
        assert len(row["seeds"]) == 2
        for mode in ("loso", "in_source"):
            cell = row[mode]["auroc_vs_xstest_safe_b"]
            values = [run[mode]["auroc_vs_xstest_safe_b"] for run in row["seeds"]]
            assert math.isclose(cell["mean"], statistics.mean(values))
            assert math.isclose(cell["std"], statistics.stdev(values), abs_tol=1e-12)
    assert set(report["zero_shot"]["sources"]) == set(gen.HARMFUL)
    text = (tmp_path / "out" / "report.md").read_text()
    assert "Non-linear read-outs" in text and "'Yes/No'" in text and "Prompts framed as" in text
    plain = json.loads((tmp_path / "plain" / "results.json").read_text())
    assert plain["mlp"] == {} and plain["zero_shot"] is None
