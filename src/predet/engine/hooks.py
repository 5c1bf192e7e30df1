"""What runs around the training loop's steps, as in Detectron2: a hook is any object with some
of ``before_train(trainer)``, ``after_step(trainer)`` and ``after_train(trainer)``. The trainer
hands over itself: ``trainer.iteration`` (steps done), ``trainer.model`` (unwrapped, not DDP),
``trainer.writer``, ``trainer.metrics``, ``trainer.run_dir``, ``trainer.rank`` ... Hooks run on
every rank, in order, with the training RNG streams put back afterwards.

The loop's own periodic work is two hooks here (metrics, checkpoints); the callers add the rest:
periodic evaluation (``predet.evaluation.evaluate.PeriodicEvaluation``), the pre-training's
held-out diagnostics (``predet.evaluation.pretext.PretextDiagnosticsHook``) and transfer probe
(``predet.evaluation.probe.TransferProbeHook``).
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from predet.engine.metrics import log_line

logger = logging.getLogger("predet.engine")


class HookBase:
    """A hook that does nothing until a subclass says otherwise."""

    def before_train(self, trainer) -> None:
        pass

    def after_step(self, trainer) -> None:
        pass

    def after_train(self, trainer) -> None:
        pass


class PeriodicWriter(HookBase):
    """Every ``period`` iterations: the smoothed losses, lr, speed and ETA to ``metrics.jsonl``
    (and TensorBoard), and a log line when no progress bar shows them. The final record is the
    trainer's own."""

    def __init__(self, period: int):
        self.period = period

    def after_step(self, trainer) -> None:
        it = trainer.iteration
        if self.period > 0 and it % self.period == 0 and it < trainer.max_iters:
            record = trainer.record(it)
            trainer.writer.write(record)
            if trainer.rank == 0 and not trainer.cfg.progress:
                logger.info(log_line(record, trainer.max_iters))


class PeriodicCheckpointer(HookBase):
    """Every ``period`` iterations, a checkpoint (a collective; the final one is the trainer's)."""

    def __init__(self, period: int):
        self.period = period

    def after_step(self, trainer) -> None:
        it = trainer.iteration
        if self.period > 0 and it % self.period == 0 and it < trainer.max_iters:
            trainer.save_checkpoint()


@contextlib.contextmanager
def rng_preserved():
    """Hooks (e.g. evaluation with random crops) must not shift the training RNG streams;
    otherwise a resumed run would diverge from an uninterrupted one."""
    py, npy, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() \
        else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)


def call_hooks(hooks: Iterable[Any], name: str, trainer) -> None:
    for hook in hooks:
        fn = getattr(hook, name, None)
        if fn is not None:
            fn(trainer)
