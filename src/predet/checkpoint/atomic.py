"""Writing a file so that a crash or a full disk leaves the old one whole: a temp file in the same
folder, fsync, ``os.replace``. Torch-free, so the sweep and the reports use it too."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from predet.errors import disk_full, is_disk_full


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable; not every platform allows opening a directory."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def umask_mode(mode: int = 0o666) -> int:
    """``mode`` less the process umask: the permissions ``open()`` gives a new file (mkstemp
    makes its files 0600, which would hide results and checkpoints from a user's group)."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


def atomic_write(path: str | Path, write: Callable[[Any], None], mode: str = "wb") -> Path:
    """Call ``write(fileobj)`` on a temp file next to ``path``, then atomically rename it.

    On any failure the temp file is removed and ``path`` keeps its previous content; a full
    disk is reported as :class:`~predet.errors.DiskFull` naming ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, umask_mode())
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if is_disk_full(exc):
            raise disk_full(path) from exc
        raise
    _fsync_dir(path.parent)
    return path
