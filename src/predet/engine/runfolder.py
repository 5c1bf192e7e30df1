"""One live process per run folder, and no half-made folder left by a user error.

``run_folder(path)`` takes ``path/.lock`` (the holder's pid and host) for the duration of a
run. A second run on the same folder is refused while the holder lives; a lock whose process
is gone (killed, crashed, rebooted, a zombie) is stale and taken over. Only the main process
of a DDP run takes it. If the folder did not exist before and the run stops with a user error
before its first checkpoint, the folder is removed again.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path

from predet.errors import DataError, RunLocked, UserError

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


_HELD: dict[str, int] = {}  # lock path -> the open descriptor holding its flock


def _forget_locks_in_child() -> None:
    """A forked child (a loader worker) must not keep the parent's lock alive: a flock lasts
    while any copy of its descriptor is open, and a worker outlives a SIGKILLed parent briefly."""
    for fd in _HELD.values():
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_forget_locks_in_child)


def _locked(folder: Path, lock: Path, holder: dict, what: str, host: str) -> RunLocked:
    pid = holder.get("pid", "?")
    where = "" if holder.get("host", host) == host else f" on host {holder.get('host')}"
    return RunLocked(
        f"{folder} is in use by another {what} (pid {pid}{where}); wait for it to finish or stop "
        f"it, or use another folder (delete {lock} only if that process is gone)")


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def acquire_lock(folder: str | Path, what: str = "run") -> Path:
    """Hold ``folder/.lock`` for this process or raise :class:`RunLocked`.

    The holder keeps an exclusive ``flock`` on the file, which the kernel drops when the
    process dies: of several processes taking over a stale lock at once exactly one wins. The
    file also names the holder (pid, host), for the message and for filesystems without flock,
    where a live holder on this host still refuses."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_FILE
    key = str(lock.resolve())
    if key in _HELD:
        return lock  # re-entrant: pretrain() then train() in one process
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(5):
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _locked(folder, lock, _read_lock(lock), what, me["host"]) from None
        except OSError:
            pass  # no flock on this filesystem: the holder's record alone decides
        if not _same_file(fd, lock):  # released (unlinked) between our open and our flock: again
            os.close(fd)
            continue
        holder = _read_lock(lock)
        pid = int(holder.get("pid", 0) or 0)
        same_host = holder.get("host", me["host"]) == me["host"]
        if pid and pid != me["pid"] and (not same_host or _alive(pid)):
            os.close(fd)
            raise _locked(folder, lock, holder, what, me["host"])
        if pid and pid != me["pid"]:
            logger.warning("taking over stale lock %s (pid %s is gone)", lock, pid)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        _HELD[key] = fd
        return lock
    raise RunLocked(f"could not take {lock}: another process keeps re-creating it")


def release_lock(lock: Path) -> None:
    """Give up ``lock`` if this process holds it."""
    lock = Path(lock)
    fd = _HELD.pop(str(lock.resolve()), None)
    if _read_lock(lock).get("pid") == os.getpid():
        lock.unlink(missing_ok=True)  # before the flock goes: a waiter that opened it tries again
    if fd is not None:
        os.close(fd)


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0") or 0) == 0


@contextlib.contextmanager
def run_folder(folder: str | Path, what: str = "run"):
    """Hold ``folder``'s lock for the block; remove a folder this block created if it ends
    with a user error before its first checkpoint (a data error keeps its skipped.jsonl)."""
    folder = Path(folder)
    created = not folder.exists()
    held_before = str((folder / LOCK_FILE).resolve()) in _HELD
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


def check_writable(path: str | Path, what: str) -> None:
    """Refuse, when a command starts, an output folder it could not write: the nearest folder
    that exists must take a file (tried, not guessed from permission bits, which root ignores)."""
    path = Path(path)
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"{what}={path}: {probe} is a file, not a folder; choose a folder")
    try:
        fd, name = tempfile.mkstemp(dir=probe, prefix=".predet-write-test-")
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise UserError(f"{what}={path}: cannot write in {probe} ({exc.strerror or exc}); choose a folder "
                        "you can write to") from None


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
