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


# What torchrun sets in each process it starts: a child of a rank (a transfer probe) must not read
# them, or it would wait to join the run's process group as one of its ranks.
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                      "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT",
                      "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_RUN_ID",
                      "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_ERROR_FILE", "TORCH_NCCL_ASYNC_ERROR_HANDLING")


def standalone_env(threads: int) -> dict:
    """The environment of a single-process child of a (maybe distributed) run: ``threads`` CPU
    threads (0: as the parent) and none of torchrun's variables."""
    env = thread_env(threads) or dict(os.environ)
    for name in TORCHRUN_VARIABLES:
        env.pop(name, None)
    return env
