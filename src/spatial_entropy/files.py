"""Files that a reader never sees half-written: a temporary file, then one rename."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

__all__ = ["atomic_write"]


def atomic_write(path: str | os.PathLike, data: bytes, *, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the whole new one.

    The bytes go to a temporary file in the same directory, are fsynced, and replace ``path``
    with ``os.replace``; the directory is fsynced so the rename itself survives a crash.
    Checkpoints, logs, metrics and the generated dataset caches are written this way.

    Args:
        path: the file to create or replace; its directory must exist.
        data: the whole content.
        mode: permission bits of the new file (e.g. ``0o644`` for a cache that other users
            read); None keeps the temporary file's private ``0o600``.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
