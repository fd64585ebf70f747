"""One way to write a file so that readers see the old or the new one, never half of one.

Every writer of the project (checkpoints, sidecars, reports, configs, engines, manifests) goes
through ``write_atomic``: a temp file in the same folder (``.<name>.<random>.tmp``, so an
interrupted write is recognisable debris), fsync, chmod (mkstemp's 0600 and the umask must not
decide), rename over the target (a symlink there is replaced, not followed), fsync of the folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def fsync_dir(path) -> None:
    """Make a rename in ``path`` durable (best effort: some filesystems refuse O_RDONLY fsync)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_tree(root) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(dirpath)


@contextlib.contextmanager
def folder_lock(folder):
    """One writer of ``folder`` at a time, across processes: an flock on the folder itself, so
    no lock file is left behind, and a killed holder releases it."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def make_dirs(path) -> Path:
    """Create ``path`` and its missing parents as 0755 whatever the umask (existing folders are
    left as they are)."""
    path = Path(path)
    _make(_missing_dirs(path))
    return path


def _missing_dirs(path: Path) -> list[Path]:
    """``path`` and its parents that do not exist yet, deepest first."""
    missing, p = [], path
    while not p.exists():
        missing.append(p)
        p = p.parent
    return missing


def _make(missing: list[Path]) -> None:
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            continue
        os.chmod(d, 0o755)


def write_with(path, writer: Callable[[str], None], mode: int = 0o644) -> Path:
    """Let ``writer(tmp_path)`` write the file, then publish it atomically at ``path``. For
    libraries that write to a path themselves (safetensors, ONNX with external data)."""
    path = Path(path)
    make_dirs(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    return path


def write_atomic(path, data: bytes | str, mode: int = 0o644) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` atomically and durably."""
    payload = data.encode("utf-8") if isinstance(data, str) else data

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(payload)

    return write_with(path, write, mode)


def write_text_atomic(path, text: str, mode: int = 0o644) -> Path:
    return write_atomic(path, text, mode)


def write_json(path, data) -> Path:
    """JSON (indented; values JSON does not know as ``str``), written atomically."""
    return write_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def copy_atomic(src, dst, mode: int = 0o644) -> Path:
    return write_with(dst, lambda tmp: shutil.copyfile(src, tmp), mode)


def output_problem(path, kind: str = "dir") -> str | None:
    """Why ``path`` cannot be written as a ``kind`` ("dir" or "file"), or None if it can: the
    check to run before long work, so a bad output path fails in a second, not after it."""
    path = Path(path)
    if path.exists():
        if kind == "dir" and not path.is_dir():
            return f"{path} is a file, not a folder"
        if kind == "file" and path.is_dir():
            return f"{path} is a folder, not a file"
        target = path if kind == "dir" else path.parent
        return None if os.access(target, os.W_OK | os.X_OK) else f"{target} is not writable"
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"{parent} is a file, not a folder (needed for {path})"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{parent} is not writable (needed for {path})"
    return None


@contextlib.contextmanager
def created_dirs(path):
    """Create the folder ``path`` (0755, as ``make_dirs``); if the block fails, remove again the
    folders this created that are still empty, so a failed step leaves no empty output folders."""
    path = Path(path)
    missing = _missing_dirs(path)
    _make(missing)
    try:
        yield path
    except BaseException:
        for d in missing:  # deepest first
            with contextlib.suppress(OSError):
                d.rmdir()  # only if empty
        raise
