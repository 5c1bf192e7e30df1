"""Errors that are the user's to fix, kept apart from bugs.

The CLI prints a :class:`UserError` as one line (cause and fix) and exits 2; anything else is
a bug and keeps its traceback (exit 1). Library callers can catch ``UserError`` the same way.
"""

from __future__ import annotations

import errno
import os


class UserError(ValueError):
    """A mistake in the inputs (config, data, files, disk): one line, exit 2."""


class Preempted(Exception):
    """Training stopped on SIGTERM or SIGINT after writing a checkpoint (engine/preemption.py):
    not a mistake, one line all the same; exit code 128 + the signal."""

    def __init__(self, signum: int, iteration: int, max_iters: int, checkpoint) -> None:
        import signal

        self.signum, self.iteration, self.checkpoint = signum, iteration, checkpoint
        self.exit_code = 128 + signum
        super().__init__(
            f"stopped by {signal.Signals(signum).name} at iteration {iteration} of {max_iters}; "
            f"checkpoint {checkpoint} written; run the same command with train.resume=true to continue")


class InputNotFound(UserError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class OutputExists(UserError, FileExistsError):
    """An output folder that already holds what would be overwritten."""


class DataError(UserError):
    """Data that loads but cannot train: too many unreadable images, no step possible."""


class CheckpointError(UserError):
    """A checkpoint that is missing, damaged, of the wrong kind, or refused."""


class RunLocked(UserError):
    """Another live process holds the run folder."""


class DiskFull(UserError):
    """No space left on the device while writing a named file."""

    def __init__(self, message: str, filename: str):
        super().__init__(message)
        self.filename = filename
        self.errno = errno.ENOSPC


def disk_full(path: str | os.PathLike, exc: OSError | None = None) -> DiskFull:
    """The one-line error for ENOSPC while writing ``path``."""
    return DiskFull(f"no space left on device while writing {path}: free space "
                                  "there (or point the output elsewhere) and run the same command "
                                  "again", str(path))


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
