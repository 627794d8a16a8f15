"""Gate-only check of two generalization levers on the demo's own training data (docs/generalization.md).

Fits the gate (`safegate.fit_gate`, frozen SmolLM2-135M states) on `DEMO_DATA/train.jsonl` (from `make demo` or
`safegate demo --data-only`), with and without phrasing augmentation (half of the non-templated harmful and Alpaca
training prompts rewritten as questions / casual requests, labels kept), on the last layer and on layer 15, then
scores XSTest's 200 unsafe contrast prompts (a source the demo never trains on) against the demo's held-out
XSTest-safe half. About 11 minutes on 2 cores.

    .venv/bin/python benchmarks/phrasing_levers.py demo-out/data
"""

import json
import sys
import time
from pathlib import Path

import torch

import safegate
from safegate.backbones.load import load_model
from safegate.data.io import read_objects
from safegate.data.phrasing import augment_phrasing
from safegate.data.sources import INSTALLED, load_named_set
from safegate.evaluation.metrics import auroc

MODEL = "builtin:smollm2-135m-instruct"


def training_records(train: list[dict], augment: bool) -> list[dict]:
    records = [dict(prompt=r["prompt"], label=r["label"], source=r.get("source"), augmented=r.get("augmented"))
               for r in train]  # fmt: skip
    return augment_phrasing(records, share=0.5, seed=0) if augment else records


def main(data: Path) -> None:
    torch.manual_seed(0)
    train = [r for r in read_objects(data / "train.jsonl") if r.get("gate", True)]
    benign = [r["prompt"] for r in read_objects(data / "heldout_xstest.jsonl")]
    harmful = [r["prompt"] for r in load_named_set("xstest", None, sources=INSTALLED) if r["label"] == "unsafe"]
    _, tok = load_model(MODEL, dtype="float32")

    def scores(gated: safegate.SafeGateModel, prompts: list[str]) -> list[float]:
        chats = [[{"role": "user", "content": p}] for p in prompts]
        with torch.no_grad():
            return [float(gated.classify(**tok.apply_chat_template(c, add_generation_prompt=True,
                    return_tensors="pt", return_dict=True))[0]) for c in chats]  # fmt: skip

    for augment in (False, True):
        for layer in (-1, 15):
            started = time.perf_counter()
            model, _ = load_model(MODEL, dtype="float32")
            config = safegate.GateConfig(attention_dim=256, lora_r=16, lora_alpha=32, layer=layer)
            gated = safegate.attach(model, tok, config)
            records = training_records(train, augment)
            safegate.fit_gate(gated, records, epochs=40, lr=3e-3)
            unsafe, safe = scores(gated, harmful), scores(gated, benign)
            area = auroc(unsafe + safe, [1] * len(unsafe) + [0] * len(safe))
            recall, fpr = sum(s > 0.5 for s in unsafe) / len(unsafe), sum(s > 0.5 for s in safe) / len(safe)
            print(json.dumps(dict(augment=augment, layer=layer, n_train=len(records), auroc=round(area, 3),
                                  recall=round(recall, 3), fpr=round(fpr, 3),
                                  seconds=round(time.perf_counter() - started))), flush=True)  # fmt: skip


if __name__ == "__main__":
    main(Path(sys.argv[1]))
