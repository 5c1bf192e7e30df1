"""One live process per run folder, and no half-made folder left by a user error.

``run_folder(path)`` takes ``path/.lock`` (the holder's pid and host) for the duration of a
run. A second run on the same folder is refused while the holder lives; a lock whose process
is gone (killed, crashed, rebooted, a zombie) is stale and taken over. Only the main process
of a DDP run takes it. If the folder did not exist before and the run stops with a user error
before its first checkpoint, the folder is removed again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
from pathlib import Path

from ..errors import DataError, RunLocked, UserError

logger = logging.getLogger("predet.engine")

LOCK_FILE = ".lock"


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    try:  # a zombie (exited, never reaped, e.g. orphaned in a container) holds nothing
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _read_lock(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def acquire_lock(folder: str | Path, what: str = "run") -> Path:
    """Create ``folder/.lock`` for this process or raise :class:`RunLocked`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_FILE
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_lock(lock)
            pid = int(holder.get("pid", 0) or 0)
            same_host = holder.get("host", me["host"]) == me["host"]
            if pid == me["pid"] and same_host:
                return lock  # re-entrant: pretrain() then train() in one process
            if pid and (not same_host or _alive(pid)):
                where = "" if same_host else f" on host {holder.get('host')}"
                raise RunLocked(
                    f"{folder} is in use by another {what} (pid {pid}{where}); wait for it to "
                    f"finish or stop it, or use another folder (delete {lock} only if that process "
                    "is gone)") from None
            logger.warning("removing stale lock %s (pid %s is gone)", lock, pid or "?")
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return lock
    raise RunLocked(f"could not take {lock}: another process keeps re-creating it")


def release_lock(lock: Path) -> None:
    """Remove ``lock`` if this process holds it."""
    if _read_lock(lock).get("pid") == os.getpid():
        lock.unlink(missing_ok=True)


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0") or 0) == 0


@contextlib.contextmanager
def run_folder(folder: str | Path, what: str = "run"):
    """Hold ``folder``'s lock for the block; remove a folder this block created if it ends
    with a user error before its first checkpoint (a data error keeps its skipped.jsonl)."""
    folder = Path(folder)
    created = not folder.exists()
    held_before = _read_lock(folder / LOCK_FILE).get("pid") == os.getpid()
    lock = acquire_lock(folder, what) if _is_main() else None
    try:
        yield folder
    except UserError as exc:
        kept = isinstance(exc, DataError) or any((folder / "checkpoints").glob("checkpoint_*.pth"))
        if created and _is_main() and not kept:
            shutil.rmtree(folder, ignore_errors=True)
            lock = None
        raise
    finally:
        if lock is not None and not held_before:
            release_lock(lock)


@contextlib.contextmanager
def fresh_output(folder: str | Path):
    """Remove ``folder`` again if it did not exist before the block and the block fails:
    an export or evaluation that stopped half-way leaves nothing that looks finished."""
    folder = Path(folder)
    created = not folder.exists()
    try:
        yield folder
    except BaseException:
        if created:
            shutil.rmtree(folder, ignore_errors=True)
        raise
