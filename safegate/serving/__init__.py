"""Serving gated models on vLLM with the exact CASA verdict (`docs/serving-vllm.md`).

`GatedLLM` (offline batches) imports vLLM when it is built; importing this package never needs vLLM.
"""

from safegate.hub.merged_files import write_weights_index  # fixes an export written before save_merged wrote it
from safegate.serving.checkpoint import UnservableExport, check_engine_loadable, safety_head_rows
from safegate.serving.offline import GatedLLM, GatedOutput
from safegate.serving.plan import PromptPlan, SafetyTokenInPrompt, plan_prompt

__all__ = [
    "GatedLLM",
    "GatedOutput",
    "PromptPlan",
    "SafetyTokenInPrompt",
    "UnservableExport",
    "check_engine_loadable",
    "plan_prompt",
    "safety_head_rows",
    "write_weights_index",
]
