"""Atomic file output: a reader never sees a half-written file, a crash never leaves one."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np


def _current_umask() -> int:
    """The process umask (read by setting and restoring it: POSIX offers no read-only call)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success it replaces `path` in one rename.

    The file ends with the mode a plain open() would give it (0666 less the umask), not mkstemp's 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # keep the real name as suffix: writers such as SimpleITK choose the format (and .gz) from it
    fd, tmp = tempfile.mkstemp(prefix=".tmp.", suffix=f".{path.name}", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_current_umask())  # writers that replace the file keep umask modes anyway
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def file_sha256(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_json(obj: Any, path: str | os.PathLike, indent: int = 2) -> None:
    """Write human-readable JSON atomically (numpy scalars and arrays become plain numbers and lists)."""
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=indent, default=_json_default)
            f.write("\n")


def load_json(path: str | os.PathLike) -> Any:
    with open(path) as f:
        return json.load(f)


def read_json_file(path: str | os.PathLike, what: str = "file") -> Any:
    """load_json for user-supplied files: a missing or malformed file is a DpunetError naming it."""
    from dpunet.utils.errors import DpunetError

    path = Path(path)
    if not path.is_file():
        raise DpunetError(f"{path}: {what} not found")
    try:
        return load_json(path)
    except ValueError as e:
        raise DpunetError(f"{path}: not valid JSON ({e})") from None


def _check_writable_parent(path: Path) -> None:
    """The nearest existing ancestor of `path` must be a folder we may write in (the rest is created)."""
    from dpunet.utils.errors import DpunetError

    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise DpunetError(f"{path}: cannot be created, {parent} is a file")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise DpunetError(f"{path}: cannot be created, {parent} is not writable")
            return


def check_output_file(path: str | os.PathLike) -> Path:
    """Refuse, before any work is done, an output file path that cannot be written (a folder, a file on the way)."""
    from dpunet.utils.errors import DpunetError

    path = Path(path)
    if path.is_dir():
        raise DpunetError(f"{path}: is a folder; give the path of a file to write")
    _check_writable_parent(path)
    return path


def check_output_folder(path: str | os.PathLike) -> Path:
    """Refuse, before any work is done, an output folder that is an existing file or cannot be created."""
    from dpunet.utils.errors import DpunetError

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DpunetError(f"{path}: is a file; give a folder for the output (it is created if missing)")
    if not path.exists():
        _check_writable_parent(path)
    elif not os.access(path, os.W_OK | os.X_OK):
        raise DpunetError(f"{path}: the output folder is not writable")
    return path


def write_text(text: str, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """np.savez (uncompressed, fast to load) written atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def atomic_write_with(path: str | os.PathLike, writer: Callable[[Path], None]) -> None:
    """Call `writer(tmp_path)` and move the result into place atomically (for torch.save, SimpleITK, ...)."""
    with atomic_path(path) as tmp:
        writer(tmp)
