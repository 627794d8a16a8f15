import importlib.util
import os
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")

import safegate  # noqa: E402
from safegate.testing import tiny_model_and_tokenizer  # noqa: E402

SMALL = dict(attention_dim=16, lora_r=4, lora_alpha=8)
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str):
    """The script `benchmarks/<name>.py` as a module (benchmarks are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(params=["qwen2", "llama"])
def arch(request):
    return request.param


@pytest.fixture
def gated(arch):
    model, tok = tiny_model_and_tokenizer(arch)
    return safegate.attach(model, tok, safegate.GateConfig(**SMALL))


@pytest.fixture(scope="module")
def one_thread():
    """Real models and tiny training runs are far faster on one thread when the 2 cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
