"""A gated model in transformers' `pipeline("text-generation")`: supported, with the verdict in every output.

`TextGenerationPipeline` checks its model by class name against the causal-LM mapping and logs an error for any
other name (PEFT's `PeftModelForCausalLM` is on a hard-coded list). A `SafeGateModel` is a causal LM exactly when
the backbone it gates is one, so `SafeGateTextGenerationPipeline` checks the backbone's class instead, and adds
`"safety"` (`"safe"`/`"unsafe"`) and `"safety_score"` (p(unsafe) after the gate) to each generated record.
For any other model it is the stock pipeline, unchanged.

`register()` (run when `safegate` is imported) makes it the `text-generation` implementation of transformers'
`PIPELINE_REGISTRY`, but only where that is still transformers' own class (another library's registration is
kept; pass `pipeline_class=SafeGateTextGenerationPipeline` there). `pipeline(...)` here is `transformers.pipeline`
with this class.

Example:
    >>> import safegate
    >>> from transformers import pipeline
    >>> from safegate.testing import tiny_model_and_tokenizer
    >>> model, tok = tiny_model_and_tokenizer("qwen2")
    >>> gated = safegate.attach(model, tok, safegate.GateConfig(attention_dim=16, lora_r=4))
    >>> generator = pipeline("text-generation", model=gated, tokenizer=tok)
    >>> out = generator([{"role": "user", "content": "Hi!"}], max_new_tokens=3)
    >>> out[0]["safety"] in ("safe", "unsafe"), 0.0 <= out[0]["safety_score"] <= 1.0
    (True, True)
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import pipelines as hf_pipelines
from transformers.pipelines.text_generation import ReturnType, TextGenerationPipeline
from transformers.utils import logging

from safegate.modeling.model import SafeGateModel
from safegate.modeling.tokens import padding_id

logger = logging.get_logger("transformers.pipelines.base")
TASK = "text-generation"


def _class_names(supported: list[str] | Any) -> list[str]:
    """The class names `Pipeline.check_model_type` accepts for `supported` (a list, or a model mapping)."""
    if isinstance(supported, list):
        return supported
    names: list[str] = []
    for value in supported.values():
        names.extend(value if isinstance(value, tuple) else [value])
    extra = getattr(getattr(supported, "_model_mapping", None), "_extra_content", {})
    for value in extra.values():
        names.extend(m.__name__ for m in (value if isinstance(value, tuple) else (value,)))
    return names


class SafeGateTextGenerationPipeline(TextGenerationPipeline):
    """`TextGenerationPipeline` that accepts a `SafeGateModel` whose backbone is a causal LM and reports its verdict.

    With a gated model, each record gets `"safety"` and `"safety_score"`; the safety token is never in the text
    (it is not in the returned ids unless `keep_safety_token=True`, and then it is a special token the decoding
    skips). Streaming (`streamer=`), batching and chat inputs work as with the stock pipeline.
    """

    def check_model_type(self, supported_models: list[str] | dict) -> None:
        if not isinstance(self.model, SafeGateModel):
            return super().check_model_type(supported_models)
        backbone = type(self.model.original_model).__name__
        names = _class_names(supported_models)
        if backbone not in names:
            logger.error(
                f"The model 'SafeGateModel' gates a '{backbone}', which is not supported for {self.task}. "
                f"Supported backbones are {names}."
            )

    def _forward(self, model_inputs: dict, **generate_kwargs: Any) -> dict:
        if not isinstance(self.model, SafeGateModel):
            return super()._forward(model_inputs, **generate_kwargs)
        outputs = super()._forward(model_inputs, **generate_kwargs)
        verdict = self.model.last_verdict
        rows = outputs["generated_sequence"].shape[:2]
        if verdict is None or verdict[1].numel() != rows.numel():
            raise RuntimeError("the gated model's generate did not report one verdict per generated sequence")
        labels, scores = verdict
        outputs["safety"] = torch.tensor([label == "unsafe" for label in labels]).reshape(rows)
        outputs["safety_score"] = scores.detach().float().cpu().reshape(rows)
        return outputs

    def postprocess(self, model_outputs: dict, return_type: ReturnType = ReturnType.FULL_TEXT, **kwargs: Any) -> Any:
        unsafe = model_outputs.pop("safety", None)
        scores = model_outputs.pop("safety_score", None)
        if isinstance(self.model, SafeGateModel) and return_type != ReturnType.TENSORS:
            model_outputs = {**model_outputs, "generated_sequence": self._without_safety_token(model_outputs)}
        records = super().postprocess(model_outputs, return_type=return_type, **kwargs)
        if unsafe is not None and scores is not None:
            for record, row_unsafe, score in zip(records, unsafe[0].tolist(), scores[0].tolist(), strict=True):
                record["safety"] = "unsafe" if row_unsafe else "safe"
                record["safety_score"] = score
        return records

    def _without_safety_token(self, model_outputs: dict) -> torch.Tensor:
        """The generated rows without the safety token (`keep_safety_token=True` keeps it in the ids): text never
        shows it, whatever `skip_special_tokens` says. Rows stay aligned (padded with the pad id at the end)."""
        sequences = model_outputs["generated_sequence"]
        start = 0 if model_outputs["input_ids"] is None else model_outputs["input_ids"].shape[-1]
        ids = torch.tensor([self.model.safe_token_id, self.model.unsafe_token_id], device=sequences.device)
        answer = sequences[..., start:]
        if not torch.isin(answer, ids).any():
            return sequences
        rows = [row[~torch.isin(row, ids)] for row in answer.reshape(-1, answer.shape[-1])]
        width = max(len(row) for row in rows)
        pad = padding_id(self.model.tokenizer)
        padded = torch.stack([torch.cat([row, row.new_full((width - len(row),), pad)]) for row in rows])
        return torch.cat([sequences[..., :start], padded.reshape(*answer.shape[:-1], width)], dim=-1)


def register() -> None:
    """Make `SafeGateTextGenerationPipeline` the `text-generation` pipeline, unless another class replaced
    transformers' own there (then keep it: pass `pipeline_class=` for the verdict)."""
    entry = hf_pipelines.PIPELINE_REGISTRY.supported_tasks.get(TASK)
    if entry is None:
        return
    impl = entry["impl"]
    if impl not in (TextGenerationPipeline, f"{TextGenerationPipeline.__module__}.TextGenerationPipeline"):
        return
    entry["impl"] = SafeGateTextGenerationPipeline


def pipeline(task: str = TASK, model: Any = None, **kwargs: Any) -> Any:
    """`transformers.pipeline` with `SafeGateTextGenerationPipeline` for `text-generation` (other tasks unchanged)."""
    if task == TASK:
        kwargs.setdefault("pipeline_class", SafeGateTextGenerationPipeline)
    if isinstance(model, SafeGateModel):
        kwargs.setdefault("tokenizer", model.tokenizer)
    return hf_pipelines.pipeline(task, model=model, **kwargs)
