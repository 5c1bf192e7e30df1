"""Child processes a run or a sweep starts (sweep runs, transfer probes): they die with their
parent, and a few threads each share the cores. Torch-free."""

from __future__ import annotations

import os


def die_with_parent() -> None:
    """In a child, before exec (``preexec_fn``): SIGTERM when its parent dies, even by SIGKILL (Linux)."""
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)

def thread_env(threads: int) -> dict | None:
    """The environment of a child limited to ``threads`` CPU threads (0: inherit everything).

    Several small runs side by side, one thread each, get more work out of a few CPU cores
    than one run after another using them all: a CPU detector step does not scale linearly.
    """
    if not threads:
        return None
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = str(int(threads))
    return env
