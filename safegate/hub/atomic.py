"""Atomic folder writes that replace only a bundle's own files: what `save_bundle` does on disk.

The new files are written into a hidden temporary folder next to the target (`.<name>.tmp-<pid>-<random>`), get the
modes the umask gives (safetensors writes 0600), receive a hard link to every other entry of the existing target (an
evaluation report, a `checkpoints/` folder: nothing is copied or lost), and are flushed; then the two folders are
swapped in one step (Linux `renameat2(RENAME_EXCHANGE)`, else two renames) and the old one is removed. At every
moment the target holds the complete old folder or the complete new one. Temporary folders left by a save that was
killed (SIGKILL, power loss) are removed by the next save to the same target, once nothing in them is only there.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> root = Path(tempfile.mkdtemp())
    >>> (root / "gate").mkdir(); _ = (root / "gate" / "a.txt").write_text("old")
    >>> _ = (root / "gate" / "report.md").write_text("mine")
    >>> write_folder(root / "gate", lambda tmp: (tmp / "a.txt").write_text("new"), own=["a.txt"])
    >>> sorted((p.name, p.read_text()) for p in (root / "gate").iterdir()), [p.name for p in root.iterdir()]
    ([('a.txt', 'new'), ('report.md', 'mine')], ['gate'])
    >>> import shutil; shutil.rmtree(root)
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import stat
import sys
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

_TEMP = re.compile(r"\.(?P<name>.+)\.(?:tmp|old|stage)-(?:(?P<pid>\d+)-)?[0-9a-f]+")


def write_folder(target: Path, write: Callable[[Path], object], own: Iterable[str]) -> None:
    """Make `target` hold what `write(folder)` writes, plus every entry of the old `target` outside `own`.

    Args:
        target (`Path`): The folder to create or update.
        write (`Callable[[Path], object]`): Writes the new files into the folder it is given.
        own (`Iterable[str]`): Relative paths (`/`-separated) of the files `write` owns: those of the old target are
            replaced (or removed, if `write` does not write them); every other entry is kept.
    """
    own = {Path(p).as_posix() for p in own}
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target, own)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        write(tmp)
        _set_modes(tmp, stat.S_IMODE(tmp.stat().st_mode))  # the mode mkdir got is the umask's
        if target.is_dir():
            _link_others(target, tmp, own)
            shutil.copymode(target, tmp)  # a mode the user gave the folder is kept
        for path in [*(tmp / p for p in own if (tmp / p).is_file()), *_dirs(tmp)]:
            _fsync(path)
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _dirs(root: Path) -> list[Path]:
    return [root, *(Path(d) / n for d, names, _ in os.walk(root) for n in names if not (Path(d) / n).is_symlink())]


def _set_modes(folder: Path, dir_mode: int) -> None:
    file_mode = dir_mode & 0o666
    for path in folder.rglob("*"):
        if not path.is_symlink():
            path.chmod(dir_mode if path.is_dir() else file_mode)


def _link_others(source: Path, dest: Path, own: set[str]) -> None:
    """Hard-link (copy where impossible) every entry of `source` outside `own` to the same place in `dest`."""
    for folder, dirs, files in os.walk(source):
        rel = Path(folder).relative_to(source)
        for name in [*dirs, *files]:
            src, out = Path(folder) / name, dest / rel / name
            if (rel / name).as_posix() in own or out.exists() or out.is_symlink():
                continue
            if src.is_symlink():
                out.symlink_to(os.readlink(src))
                if name in dirs:
                    dirs.remove(name)  # do not walk into a linked folder
            elif src.is_dir():
                out.mkdir()
                shutil.copystat(src, out)
            else:
                try:
                    os.link(src, out)
                except OSError:  # another filesystem, or one without hard links
                    shutil.copy2(src, out)


def remove_stale_temporaries(target: Path, own: Iterable[str]) -> None:
    """Remove temporary folders of earlier saves to `target` whose process is gone and that hold nothing unique.

    A temporary folder may hold links to the target's other files (or, after a crash between two renames, the only
    copy of them); it is removed only if every entry outside `own` also exists in `target`.
    """
    own = {Path(p).as_posix() for p in own}
    try:
        candidates = list(target.parent.iterdir())
    except OSError:
        return
    for path in candidates:
        match = _TEMP.fullmatch(path.name)
        if not match or match["name"] != target.name or not path.is_dir() or path.is_symlink():
            continue
        pid = int(match["pid"]) if match["pid"] else None
        if pid is not None and (pid == os.getpid() or _alive(pid)):
            continue
        if _only_copies(path, target, own):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    if not hasattr(os, "kill") or sys.platform.startswith("win"):
        return True  # cannot tell: keep it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _only_copies(stale: Path, target: Path, own: set[str]) -> bool:
    for folder, _, files in os.walk(stale):
        rel = Path(folder).relative_to(stale)
        for name in files:
            if (rel / name).as_posix() not in own and not (target / rel / name).exists():
                return False
    return True


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_dir(new: Path, target: Path) -> None:
    """Make `new` appear at `target` in one step; the old folder (if any) is removed afterwards."""
    if not target.exists() or (target.is_dir() and not any(target.iterdir())):
        os.replace(new, target)
    elif _exchange(new, target):
        shutil.rmtree(new)  # `new` now holds the old folder
    else:  # no atomic exchange: two renames, the old folder kept aside until the new one is in place
        old = target.parent / f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        os.rename(target, old)
        try:
            os.rename(new, target)
        except BaseException:
            os.rename(old, target)
            raise
        shutil.rmtree(old, ignore_errors=True)
    _fsync(target.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with Linux `renameat2(RENAME_EXCHANGE)`; False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))
