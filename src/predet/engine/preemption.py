"""Stopping cleanly on SIGTERM and SIGINT: what SLURM and Kubernetes send before a pre-emption,
and Ctrl-C.

The first signal lets the current step finish; the trainer then writes a checkpoint (the same
one a periodic checkpoint would be, so ``train.resume=true`` continues bit-exactly), releases
the run folder's lock and raises :class:`Preempted`, which the CLI prints as one line. A second
signal ends the process at once. Training-loader workers ignore both signals (a scheduler may
signal every process; Ctrl-C reaches the whole group): the trainer ends them through the loader.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

import torch

logger = logging.getLogger("predet.engine")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """While active, SIGTERM and SIGINT set :attr:`signum` instead of ending the process.

    Only the main thread can take signals: elsewhere (a training run inside a thread) the
    block changes nothing and the signals keep their usual effect."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # the second signal: at once, as if we had not caught it
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        logger.warning("%s received: finishing this step and writing a checkpoint (send it again to stop "
                       "at once)", signal.Signals(signum).name)

    def requested(self, world_size: int = 1) -> int | None:
        """The signal some rank received, or None. Collective when ``world_size`` > 1: every
        rank must stop at the same step, so each step asks all of them."""
        if world_size <= 1:
            return self.signum
        flag = torch.tensor([self.signum or 0], dtype=torch.int64)
        if torch.distributed.get_backend() == "nccl":
            flag = flag.cuda()
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item()) or None


def ignore_stop_signals(worker_id: int | None = None) -> None:
    """``worker_init_fn`` of a training loader: SIGTERM and SIGINT are the main process's to
    handle (a scheduler may signal every process, Ctrl-C reaches the whole group); the trainer
    finishes its step, checkpoints, then shuts its loader down, which ends the workers."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def ignore_ctrl_c(worker_id: int | None = None) -> None:
    """``worker_init_fn`` of an evaluation loader: Ctrl-C is the main process's to handle;
    SIGTERM keeps its effect (how Python ends a loader's workers that outlive it at exit)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the trainer's handler a forked worker inherits
