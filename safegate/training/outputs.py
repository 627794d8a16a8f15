"""Every output path of a training run, checked before any work starts (nothing trained is then lost at save time).

`safegate train` and `run_recipe` check `training.output_dir` (the Trainer's checkpoints) and `output.bundle`;
`safegate.train` checks its `output_dir`. A path that is a file, a folder that cannot be created, a non-empty
folder that is not a bundle as the bundle target, or a bundle target that would receive the Trainer's checkpoints
is a `ValueError` naming the setting, the path and the fix.

Example:
    >>> import tempfile, pathlib
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (root / "notes.txt").write_text("mine")
    >>> check_output_dir(root / "notes.txt", "training.output_dir")
    Traceback (most recent call last):
    ...
    ValueError: training.output_dir '.../notes.txt' is a file; pass a folder path.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def check_output_dir(path: str | os.PathLike, name: str) -> Path:
    """`path` as an absolute `Path` if it is a folder or can be created as one, else a `ValueError`."""
    target = Path(os.path.abspath(path))
    if target.exists() and not target.is_dir():
        raise ValueError(f"{name} {str(path)!r} is a file; pass a folder path.")
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(
            f"{name} {str(path)!r}: cannot create it under {str(parent)!r} (not a writable folder); choose another "
            "path."
        )
    return target


def check_bundle_target(bundle: str | os.PathLike, output_dir: str | os.PathLike | None) -> None:
    """The bundle folder can be written after training: new, empty or a bundle, and not where checkpoints go."""
    target = check_output_dir(bundle, "output.bundle")
    try:
        from safegate.hub.files import CONFIG_NAME, BundleError, check_target
    except ImportError:  # no bundle support: the trainable state is written into the folder, beside anything
        return
    try:
        check_target(target)
    except BundleError as err:
        raise ValueError(f"output.bundle: {err} (checked before training, so nothing is lost).") from None
    if output_dir is None or (target / CONFIG_NAME).is_file():
        return
    checkpoints = Path(os.path.abspath(output_dir))
    if checkpoints == target or target in checkpoints.parents:
        raise ValueError(
            f"output.bundle {str(bundle)!r} would hold the Trainer's checkpoints (training.output_dir "
            f"{str(output_dir)!r}), and a folder with other files cannot become a bundle. Use a separate folder, "
            f"e.g. output.bundle={os.path.join(str(output_dir), 'bundle')}."
        )


def check_recipe_outputs(recipe: Any, default_output_dir: str) -> None:
    """`training.output_dir` (default `default_output_dir`) and `output.bundle` of a recipe (see the module
    docstring)."""
    output_dir = recipe.training.get("output_dir") or default_output_dir
    check_output_dir(output_dir, "training.output_dir")
    if recipe.output.bundle:
        check_bundle_target(recipe.output.bundle, output_dir)
