"""The files of a gate bundle: names, errors, finding them (folder or Hub snapshot), strict reading, checksums.

`safegate.hub.bundle` builds and applies bundles, `safegate.hub.schema` checks what they hold and
`safegate.hub.atomic` writes their folders; this module only deals with bytes on disk and re-exports nothing.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> tmp = Path(tempfile.mkdtemp())
    >>> _ = (tmp / CONFIG_NAME).write_text("{}")
    >>> bundle_sizes(tmp), read_json(tmp / CONFIG_NAME)
    ({'safegate_config.json': 2}, {})
    >>> import shutil; shutil.rmtree(tmp)
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError
from safetensors.torch import load_file

SCHEMA_VERSION = 1
FORMAT = "safegate-bundle"
CONFIG_NAME = "safegate_config.json"
WEIGHTS_NAME = "safegate.safetensors"
ADAPTER_DIR = "adapter"
ADAPTER_CONFIG_NAME = f"{ADAPTER_DIR}/adapter_config.json"
ADAPTER_WEIGHTS_NAME = f"{ADAPTER_DIR}/adapter_model.safetensors"
CARD_NAME = "README.md"
REQUIRED_FILES = (CONFIG_NAME, WEIGHTS_NAME, ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME)
BUNDLE_FILES = (CARD_NAME, *REQUIRED_FILES)
CHECKSUMMED = (WEIGHTS_NAME, ADAPTER_WEIGHTS_NAME)
PAPER_URL = "https://arxiv.org/abs/2604.00310"
# Compared on load, in this order; the first difference names the error's field.
FINGERPRINT = ("gated_model_type", "hidden_size", "num_layers", "vocab_rows", "tied")


class BundleError(ValueError):
    """A bundle that cannot be read or written: missing, truncated or corrupt files, unknown schema version."""


class BundleNotFoundError(BundleError, FileNotFoundError):
    """No bundle at that path, and no such Hub repo (or not in the cache when offline)."""


class BundleMismatchError(BundleError):
    """The bundle does not fit the model: `field`, `bundle_value` and `model_value` say where."""

    def __init__(self, field: str, bundle_value: Any, model_value: Any, hint: str = "", others: Sequence = ()) -> None:
        self.field, self.bundle_value, self.model_value = field, bundle_value, model_value
        message = f"the bundle does not fit this model: `{field}` is {bundle_value!r} in the bundle, "
        message += f"{model_value!r} in the model."
        if others:
            message += " Also different: " + "; ".join(f"`{f}` {b!r} vs {m!r}" for f, b, m in others) + "."
        super().__init__(f"{message} {hint}".strip())


def read_json(path: Path) -> Any:
    """Parsed JSON of `path`; `BundleError` if it is truncated or not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BundleError(f"{path} is not valid JSON (truncated or corrupt: {err}). Re-export the bundle.") from err


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file (never pickle); `BundleError` if it is truncated or corrupt."""
    try:
        return load_file(str(path))
    except Exception as err:  # noqa: BLE001 - safetensors raises its own SafetensorError type
        raise BundleError(f"{path} is not a readable safetensors file (truncated or corrupt: {err}).") from err


def file_record(path: Path) -> dict[str, Any]:
    """Size and sha256 of `path`, as recorded in `safegate_config.json`."""
    return {"size": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def check_file(folder: Path, name: str, record: Any) -> None:
    """Raise `BundleError` unless `folder / name` has the size and sha256 of `record`."""
    if not isinstance(record, dict) or not {"size", "sha256"} <= set(record):
        raise BundleError(f"{CONFIG_NAME} has no size/sha256 record for `{name}`.")
    path = folder / name
    size = path.stat().st_size
    if size != record["size"]:
        raise BundleError(
            f"`{name}` is {size} bytes but {CONFIG_NAME} records {record['size']}: the file is truncated or was "
            "replaced. Re-download or re-export the bundle."
        )
    if hashlib.sha256(path.read_bytes()).hexdigest() != record["sha256"]:
        raise BundleError(f"`{name}` does not match its sha256 in {CONFIG_NAME}: the file is corrupt or was edited.")


def check_target(target: Path) -> None:
    """Raise `BundleError` if saving to `target` would replace a file or a folder that is not a bundle."""
    if target.is_file() or (target.exists() and not target.is_dir()):
        raise BundleError(f"cannot save a bundle to {target}: it is a file. Choose a folder path.")
    if target.is_dir() and any(target.iterdir()) and not (target / CONFIG_NAME).is_file():
        raise BundleError(
            f"refusing to replace {target}: the folder is not empty and is not a safegate bundle (no {CONFIG_NAME})."
            " Choose a new or empty folder."
        )


def bundle_sizes(folder: str | os.PathLike) -> dict[str, int]:
    """Size in bytes of every bundle file present in `folder` (relative names, sorted)."""
    root = Path(folder)
    return {name: (root / name).stat().st_size for name in sorted(BUNDLE_FILES) if (root / name).is_file()}


def versions() -> dict[str, str]:
    """Versions of safegate and the libraries whose formats a bundle depends on."""
    import huggingface_hub
    import peft
    import safetensors
    import transformers

    from safegate import __version__

    return {
        "safegate": __version__, "transformers": transformers.__version__, "peft": peft.__version__,
        "torch": torch.__version__, "huggingface_hub": huggingface_hub.__version__,
        "safetensors": safetensors.__version__,
    }  # fmt: skip


def resolve_bundle(
    path_or_repo_id: str,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
) -> Path:
    """The local folder of a bundle: `path_or_repo_id` itself, or its Hub snapshot (`snapshot_download`)."""
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        if revision is not None:
            raise ValueError(f"`revision={revision!r}` applies to Hub repos, but {path} is a local folder.")
        return path
    if path.exists():
        raise BundleError(f"{path} is a file; a bundle is a folder (e.g. the one `save_bundle` wrote).")
    where = f"{path_or_repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    try:
        folder = snapshot_download(
            str(path_or_repo_id), revision=revision, token=token, cache_dir=cache_dir,
            local_files_only=local_files_only, force_download=force_download,
            allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, f"{ADAPTER_DIR}/*", CARD_NAME],
        )  # fmt: skip
    except HFValidationError as err:
        raise BundleNotFoundError(f"no bundle folder {where}, and it is not a valid Hub repo id: {err}") from err
    except (LocalEntryNotFoundError, HfHubHTTPError) as err:
        from huggingface_hub import constants

        offline = " (offline: HF_HUB_OFFLINE=1 or local_files_only=True)" if constants.HF_HUB_OFFLINE else ""
        raise BundleNotFoundError(
            f"no bundle folder {where}, and the Hub repo could not be resolved{offline}: {err}"
        ) from err
    return Path(folder)
