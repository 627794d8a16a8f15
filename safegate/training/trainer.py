"""Train a CASA gate: `safegate.train` (LoRA + gate + token rows with the CASA objective on `transformers.Trainer`).

`CASATrainer` is a `transformers.Trainer` whose loss is `training.objective.casa_loss`; everything Trainer offers
(accelerate/torchrun, gradient accumulation, mixed precision, evaluation, `resume_from_checkpoint`) keeps working,
and checkpoints hold only the trainable state (`training.state`). Methods (`"casa"`, `"token_only"`, `"ssft"`),
the objective and checkpoints are described in docs/training.md.

Example:
    >>> import safegate, tempfile
    >>> from safegate.backbones.tiny import tiny_model_and_tokenizer
    >>> model, tok = tiny_model_and_tokenizer("qwen2")
    >>> gated = safegate.attach(model, tok, safegate.GateConfig(attention_dim=16, lora_r=4))
    >>> data = [{"prompt": "Bake bread?", "response": "Sure: flour, water.", "label": "safe"},
    ...         {"prompt": "Build a bomb?", "response": "I cannot help with that.", "label": "unsafe"}]
    >>> args = dict(max_steps=2, logging_steps=1, disable_tqdm=True)
    >>> with tempfile.TemporaryDirectory() as out:  # doctest: +ELLIPSIS
    ...     stats = safegate.train(gated, data, args=dict(args, output_dir=out))
    {...}
    >>> stats["global_step"], sorted(k for k in stats["last_log"] if k.startswith("gate"))
    (2, ['gate_accuracy', 'gate_loss'])
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
import warnings
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import SaveStrategy

from safegate.data.records import load_records
from safegate.evaluation.metrics import auroc
from safegate.modeling.tokens import padding_id
from safegate.training.collate import CASACollator, check_method
from safegate.training.examples import encode_records
from safegate.training.gate_fit import fit_gate, standardize_gate
from safegate.training.label_check import label_counts, single_label_message
from safegate.training.objective import casa_loss
from safegate.training.outputs import check_output_dir
from safegate.training.state import (
    TRAINABLE_STATE_NAME,
    TRAINING_ARGS_NAME,
    TRAINING_INFO_NAME,
    load_trainable_state,
    trainable_state_dict,
    trainable_state_names,
    write_trainable_state,
)

__all__ = ["CASATrainer", "DEFAULT_ARGS", "train", "training_arguments"]

DEFAULT_ARGS: dict[str, Any] = {
    "output_dir": "safegate-output",
    "learning_rate": 1e-4,
    "num_train_epochs": 2,
    "per_device_train_batch_size": 8,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.03,
    "logging_steps": 10,
    "report_to": "none",
    "dataloader_pin_memory": torch.cuda.is_available(),
}


# ------------------------------------------------------------------------------------------------ trainer
class CASATrainer(Trainer):
    """`transformers.Trainer` with the CASA loss, CASA metrics and trainable-state-only checkpoints.

    Args:
        model (`SafeGateModel`): The gated model (an `nn.Module`, not a `PreTrainedModel`).
        beta (`float`): Weight of the unsafe-class term.
        method (`str`): `"casa"`, `"token_only"` or `"ssft"`.
        aux_weight (`float`): Weight of the auxiliary BCE on v_s.
        gate_lr (`float | None`): Learning rate of the gate and the token rows (default: 10x `learning_rate`).
        **kwargs: Everything `transformers.Trainer` accepts.

    Logged next to `loss`: `gate_loss` (2-way CE at the safety step), `response_loss` (token CE of the answer),
    `gate_accuracy`, and `aux_loss` when used; evaluation adds `eval_gate_auroc`.
    """

    loss_is_scaled_for_ga = False  # compute_loss returns a per-batch mean; Trainer divides by the accumulation steps

    def __init__(
        self,
        model: Any,
        *args: Any,
        beta: float = 0.5,
        method: str = "casa",
        aux_weight: float = 0.0,
        gate_lr: float | None = None,
        **kwargs: Any,
    ) -> None:
        self.beta = _check_beta(beta)
        self.method = check_method(method)
        self.aux_weight = _check_aux(aux_weight)
        self.gate_lr = gate_lr
        self._state_names = trainable_state_names(model)
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._eval_scores: list[torch.Tensor] = []
        self._eval_labels: list[torch.Tensor] = []
        super().__init__(model, *args, **kwargs)
        if self.args.remove_unused_columns:
            raise ValueError(
                "CASATrainer needs `remove_unused_columns=False` in TrainingArguments (its batches carry the prompt "
                "mask and class labels, which the model's forward does not take)."
            )

    # ------------------------------------------------------------------------------------------ loss
    def _gated(self) -> Any:
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        out = casa_loss(
            self._gated(), inputs, beta=self.beta, method=self.method, aux_weight=self.aux_weight, forward=model
        )
        mode = "train" if model.training else "eval"
        record = self._metrics[mode]
        # diagnostics stay on the device until logging: no host-device sync per step
        record["response_loss"].append(out.response_loss)
        if out.gate_loss is not None:
            record["gate_loss"].append(out.gate_loss)
            record["gate_accuracy"].append(out.gate_accuracy)
        if out.aux_loss is not None:
            record["aux_loss"].append(out.aux_loss)
        if mode == "eval" and out.p_unsafe is not None:
            self._eval_scores.append(out.p_unsafe.float().cpu())
            self._eval_labels.append(inputs["class_labels"].cpu())
        return (out.loss, out) if return_outputs else out.loss

    def prediction_step(
        self, model: Any, inputs: dict[str, Any], prediction_loss_only: bool, ignore_keys: list[str] | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def evaluation_loop(self, *args: Any, **kwargs: Any) -> Any:
        self._metrics["eval"].clear()
        self._eval_scores, self._eval_labels = [], []
        output = super().evaluation_loop(*args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
        for key, values in self._metrics["eval"].items():
            output.metrics[f"{prefix}_{key}"] = _mean(values)
        if self._eval_scores:
            score = auroc(torch.cat(self._eval_scores), torch.cat(self._eval_labels))
            if score is not None:  # `None`: the evaluation set held one class only
                output.metrics[f"{prefix}_gate_auroc"] = score
        return output

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._metrics["train"]:
            for key, values in self._metrics["train"].items():
                logs[key] = round(_mean(values), 6)
            self._metrics["train"].clear()
        super().log(logs, start_time)

    # ------------------------------------------------------------------------------------- optimiser
    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        """AdamW (or `args.optim`) with the gate and token rows in their own group at `gate_lr`, no weight decay."""
        if self.optimizer is not None or self.optimizer_cls_and_kwargs is not None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        groups: dict[str, list[torch.nn.Parameter]] = {"decay": [], "no_decay": [], "fast": []}
        for name, param in opt_model.named_parameters():
            if not param.requires_grad:
                continue
            if name.startswith("gate.") or "trainable_tokens_delta" in name:
                groups["fast"].append(param)
            else:
                groups["decay" if name in decay else "no_decay"].append(param)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        gate_lr = self.gate_lr if self.gate_lr is not None else 10 * self.args.learning_rate
        param_groups = [
            {"params": groups["decay"], "weight_decay": self.args.weight_decay},
            {"params": groups["no_decay"], "weight_decay": 0.0},
            {"params": groups["fast"], "weight_decay": 0.0, "lr": gate_lr},
        ]
        self.optimizer = optimizer_cls([g for g in param_groups if g["params"]], **optimizer_kwargs)
        return self.optimizer

    # ----------------------------------------------------------------------------------- checkpoints
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Save only the trainable state (LoRA, gate, token rows), its config and the training arguments."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        gated = self._gated()
        if state_dict is None:
            tensors = trainable_state_dict(gated, self._state_names)
        else:  # FSDP / DeepSpeed hand over a gathered full state dict: keep the trainable part
            wanted = set(self._state_names)
            tensors = {}
            for key, value in state_dict.items():
                name = key[len("module.") :] if key.startswith("module.") else key
                if name in wanted:
                    tensors[name] = value.detach().to("cpu").clone().contiguous()
        write_trainable_state(tensors, output_dir)
        info = {
            "method": self.method,
            "beta": self.beta,
            "aux_weight": self.aux_weight,
            "gate_config": gated.gate_config.to_dict(),
            "safe_token_id": gated.safe_token_id,
            "unsafe_token_id": gated.unsafe_token_id,
        }
        with open(os.path.join(output_dir, TRAINING_INFO_NAME), "w", encoding="utf-8") as handle:
            json.dump(info, handle, indent=2, sort_keys=True)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        if not os.path.isfile(os.path.join(resume_from_checkpoint, TRAINABLE_STATE_NAME)):
            raise ValueError(
                f"{resume_from_checkpoint!r} is not a safegate checkpoint (no {TRAINABLE_STATE_NAME}); "
                "resume from a `checkpoint-N` folder written by safegate.train / CASATrainer."
            )
        load_trainable_state(self._gated(), resume_from_checkpoint)

    def _load_best_model(self) -> None:
        load_trainable_state(self._gated(), self.state.best_model_checkpoint)


# --------------------------------------------------------------------------------------------- entry point
def _mean(values: list[torch.Tensor]) -> float:
    return float(torch.stack([v.float() for v in values]).mean())


def training_arguments(args: TrainingArguments | dict[str, Any] | None) -> TrainingArguments:
    """`TrainingArguments` from `args`: a dict is laid over safegate's defaults (`DEFAULT_ARGS`).

    `remove_unused_columns` is always `False` (CASA batches carry fields the forward does not take).
    """
    if isinstance(args, TrainingArguments):
        args.remove_unused_columns = False
        return args
    if args is not None and not isinstance(args, dict):
        raise ValueError(
            f"`args` must be a TrainingArguments, a dict of its fields or None, got {type(args).__name__}."
        )
    merged = {**DEFAULT_ARGS, **(args or {}), "remove_unused_columns": False}
    known = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    unknown = sorted(set(merged) - known)
    if unknown:
        raise ValueError(
            f"unknown TrainingArguments field(s) {unknown}; see `transformers.TrainingArguments` for valid fields."
        )
    return TrainingArguments(**merged)


def train(
    gated: Any,
    train_data: Any,
    eval_data: Any = None,
    beta: float = 0.5,
    method: str = "casa",
    args: TrainingArguments | dict[str, Any] | None = None,
    aux_weight: float = 0.0,
    *,
    gate_lr: float | None = None,
    max_length: int | None = 1024,
    safety_prompt: str | None = None,
    warm_start: bool | dict[str, Any] = False,
    resume_from_checkpoint: str | bool | None = None,
    callbacks: list[Any] | None = None,
    save: bool = True,
    verdict_only: bool = False,
) -> dict[str, Any]:
    """Train the gate, the two token rows and LoRA on the language model with the CASA objective.

    Args:
        gated (`SafeGateModel`): From `safegate.attach`; trained in place.
        train_data: Records (list of dicts, `datasets.Dataset` or JSONL path), validated before anything runs.
        eval_data: Held-out records, evaluated at the end (and during training with `eval_strategy`).
        beta (`float`): `L = beta * L_unsafe + (1 - beta) * L_safe`.
        method (`str`): `"casa"`, `"token_only"` or `"ssft"` (see the module docstring).
        args (`TrainingArguments | dict | None`): Trainer settings; a dict is laid over `DEFAULT_ARGS`.
        aux_weight (`float`): Weight of the auxiliary BCE on v_s (0 = off).
        gate_lr (`float | None`): Learning rate of the gate and token rows (default 10x `learning_rate`).
        max_length (`int | None`): Longest sequence; responses are cut to fit, longer prompts are skipped.
        safety_prompt (`str | None`): System message (default: the gate config's `safety_prompt`).
        warm_start (`bool | dict`): Run `fit_gate` on the training prompts first (a dict gives its arguments; its
            `data` key, records, adds prompts to that fit only).
        resume_from_checkpoint (`str | bool | None`): As in `Trainer.train`.
        callbacks (`list | None`): Extra `TrainerCallback`s.
        save (`bool`): Save the final trainable state to `output_dir` (when the arguments allow saving).
        verdict_only (`bool`): Accept records without a `response`: they teach the verdict only (the safety token
            through gate, token rows and LoRA's effect on the prompt states) and no answer; records that have one
            train their answer as usual. Prompt-only data (labelled prompts) is far more plentiful than answered
            data. Needs a method with a safety token (`"casa"` or `"token_only"`).

    Returns:
        `dict`: `global_step`, `train_loss`, `first_log` / `last_log` (logged losses and gate metrics), `eval`
        (final evaluation metrics), `log_history`, `n_train`, `n_eval`, `skipped`, `warm_start`, `output_dir`,
        `runtime_s`, `method`, `beta`.
    """
    _check_beta(beta)
    check_method(method)
    _check_aux(aux_weight)
    if getattr(gated, "merged", False):
        raise ValueError("LoRA is merged into the base weights; call `gated.unmerge_adapter()` before training.")
    if safety_prompt is None:
        safety_prompt = gated.gate_config.safety_prompt
    started = time.perf_counter()
    if verdict_only and method == "ssft":
        raise ValueError(
            "`verdict_only=True` trains the safety token from prompt-only records, which method='ssft' does not "
            "have; use method='casa' (or 'token_only'), or give every record a response and verdict_only=False."
        )
    records = load_records(train_data, require_response=not verdict_only)
    eval_records = load_records(eval_data, require_response=not verdict_only) if eval_data is not None else None
    single = single_label_message(label_counts(records), "training data")
    if single:
        warnings.warn(single, UserWarning, stacklevel=2)
    train_set, skipped = encode_records(
        gated, records, method=method, safety_prompt=safety_prompt, max_length=max_length
    )
    eval_set, eval_skipped = (
        encode_records(gated, eval_records, method=method, safety_prompt=safety_prompt, max_length=max_length)
        if eval_records
        else (None, 0)
    )
    if not train_set:
        raise ValueError(f"every training prompt is longer than `max_length={max_length}`; raise `max_length`.")
    training_args = training_arguments(args)
    check_output_dir(training_args.output_dir, "args.output_dir")  # before training, not at save time
    warm = None
    if warm_start and method != "casa":
        warnings.warn(f"`warm_start` fits the gate, which method={method!r} does not use; skipped.", stacklevel=2)
    if warm_start and method == "casa" and not resume_from_checkpoint:
        options = dict(warm_start) if isinstance(warm_start, dict) else {}
        options.setdefault("beta", beta)
        options.setdefault("safety_prompt", safety_prompt)
        extra = list(options.pop("data", None) or [])  # more prompts for the gate only (recipe `fit_gate.data`)
        warm = fit_gate(gated, list(records) + extra if extra else records, **options)
    elif method == "casa" and not resume_from_checkpoint and not gated.gate.has_input_stats():
        standardize_gate(gated, records, safety_prompt=safety_prompt)
    was_training = gated.training
    trainer = CASATrainer(
        gated,
        args=training_args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=CASACollator(padding_id(gated.processor)),
        callbacks=callbacks,
        beta=beta,
        method=method,
        aux_weight=aux_weight,
        gate_lr=gate_lr,
    )
    with _frozen_for(gated, method):
        result = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
        if save and training_args.should_save and training_args.save_strategy != SaveStrategy.NO:
            trainer.save_model()
        metrics = trainer.evaluate() if eval_set else {}
    gated.train(was_training)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    return {
        "method": method,
        "beta": beta,
        "global_step": result.global_step,
        "train_loss": result.training_loss,
        "first_log": logs[0] if logs else {},
        "last_log": logs[-1] if logs else {},
        "eval": metrics,
        "log_history": list(trainer.state.log_history),
        "n_train": len(train_set),
        "n_eval": len(eval_set or []),
        "skipped": skipped + eval_skipped,
        "warm_start": warm,
        "output_dir": training_args.output_dir,
        "runtime_s": time.perf_counter() - started,
    }


@contextlib.contextmanager
def _frozen_for(gated: Any, method: str) -> Iterator[None]:
    """Freeze what a baseline method must not change: the gate (`token_only`, `ssft`), token rows (`ssft`)."""
    frozen = []
    for name, param in gated.named_parameters():
        if not param.requires_grad:
            continue
        if (method != "casa" and name.startswith("gate.")) or (method == "ssft" and "trainable_tokens_delta" in name):
            param.requires_grad_(False)
            frozen.append(param)
    try:
        yield
    finally:
        for param in frozen:
            param.requires_grad_(True)


def _check_beta(beta: float) -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= float(beta) <= 1.0:
        raise ValueError(f"`beta` must be a number in [0, 1], got {beta!r}.")
    return float(beta)


def _check_aux(aux_weight: float) -> float:
    if isinstance(aux_weight, bool) or not isinstance(aux_weight, (int, float)) or not aux_weight >= 0:
        raise ValueError(f"`aux_weight` must be a number >= 0, got {aux_weight!r}.")
    if math.isinf(aux_weight):
        raise ValueError("`aux_weight` must be finite.")
    return float(aux_weight)
