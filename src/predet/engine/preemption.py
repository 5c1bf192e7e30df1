"""Stopping cleanly on SIGTERM and SIGINT: what SLURM and Kubernetes send before a pre-emption,
and Ctrl-C.

The first signal lets the current step finish; the trainer then writes a checkpoint (the same
one a periodic checkpoint would be, so ``train.resume=true`` continues bit-exactly), releases
the run folder's lock and raises :class:`Preempted`, which the CLI prints as one line. A second
signal ends the process at once. Training-loader workers ignore both signals (a scheduler may
signal every process; Ctrl-C reaches the whole group): the trainer ends them through the loader
(:func:`end_loader_workers`), and so does an exit-time hook for any loader it could not reach.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import threading
import weakref
from collections.abc import Iterable, Iterator

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


# Iterators of training loaders whose workers may still run. Python's exit ends a process's
# leftover multiprocessing children with SIGTERM and then waits for them; these workers ignore
# SIGTERM, so one left alive (e.g. held by the traceback of a failed run, a reference cycle the
# garbage collector has not reached before exit) would make the interpreter wait forever.
_LIVE_ITERATORS: weakref.WeakSet = weakref.WeakSet()


def open_training_iter(loader: Iterable) -> Iterator:
    """``iter(loader)`` for a loader whose workers ignore stop signals; see :func:`end_loader_workers`."""
    data_iter = iter(loader)
    try:
        _LIVE_ITERATORS.add(data_iter)
    except TypeError:  # not weak-referenceable: a plain iterator, no workers to end
        pass
    return data_iter


def end_loader_workers(data_iter: Iterator | None) -> None:
    """End a DataLoader iterator's worker processes now, the way its own ``__del__`` would.

    Called where a run ends (success, error or pre-emption) rather than left to garbage
    collection: whatever else still refers to the iterator, its workers are gone."""
    shutdown = getattr(data_iter, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    # the loader joins each worker for a few seconds, then "terminates" it with the SIGTERM these
    # ignore: one still busy (a slow read) is ended here instead
    for worker in getattr(data_iter, "_workers", ()):
        if worker.is_alive():
            worker.kill()
            worker.join()
    _LIVE_ITERATORS.discard(data_iter)


@atexit.register  # registered after multiprocessing's own exit hook, so it runs before it
def _end_leftover_workers() -> None:
    for data_iter in list(_LIVE_ITERATORS):
        end_loader_workers(data_iter)
