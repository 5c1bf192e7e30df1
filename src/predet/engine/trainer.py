"""The training loop both halves share: a small loop with hooks, in the spirit of torchvision's
references/detection loop and Detectron2's ``SimpleTrainer``.

:class:`Trainer` holds a run's state and does one thing per iteration: read a batch, count what
could not be read, step. Everything periodic is a hook (``predet.engine.hooks``): metrics,
checkpoints, and what the caller adds (evaluation, pretext diagnostics, transfer probes). :func:`train` is the
entry point the two halves call.

Iteration numbers count completed optimizer steps: ``checkpoint_0000020.pth`` holds the state
after 20 steps, and resuming from it calls ``make_loader(20)``, whose first batch is the 21st.
A run that is interrupted and resumed ends with the same weights, bit for bit on CPU, as one
that was not: model, optimizer, scheduler, grad scaler and every rank's RNG states are saved
(``predet.engine.resume``), and the caller's loader is deterministic in the iteration.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn
from tqdm.auto import tqdm

from predet.checkpoint.atomic import atomic_write
from predet.checkpoint.io import (
    capture_rng_state,
    latest_checkpoint,
    prune_checkpoints,
    remove_stale_temp_files,
    save_checkpoint,
    write_last_checkpoint,
)
from predet.config import ConfigError, SolverConfig, TrainConfig
from predet.engine.distributed import (
    all_gather_object,
    barrier,
    move_to_device,
    unwrap_model,
)
from predet.engine.hooks import (
    PeriodicCheckpointer,
    PeriodicWriter,
    call_hooks,
    rng_preserved,
)
from predet.engine.launch import launch
from predet.engine.metrics import (
    METRICS_FILE,
    Meters,
    MetricsWriter,
    log_line,
    metrics_record,
    progress_postfix,
    summarize,
    truncate_metrics,
)
from predet.engine.optim import (
    AMP_DTYPES,
    build_lr_scheduler,
    build_optimizer,
    check_solver,
    lr_at,
)
from predet.engine.preemption import StopSignals, end_loader_workers, open_training_iter
from predet.engine.resume import (
    load_resume_checkpoint,
    plain,
    restore_rank_rng,
    restore_training_state,
)
from predet.engine.skips import SkipLedger
from predet.errors import DataError, Preempted

logger = logging.getLogger("predet.engine")


@dataclass
class TrainResult:
    """What a finished (or already finished) run reports."""

    iteration: int
    losses: dict[str, float]
    skipped: int
    run_dir: Path
    last_checkpoint: Path | None
    metrics: dict[str, float] = field(default_factory=dict)
    final_model: Path | None = None


def seed_everything(seed: int) -> None:
    """Seed python, NumPy and torch (all devices) so a run is repeatable."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def default_config_dict(solver: SolverConfig, cfg: TrainConfig) -> dict:
    return {"solver": asdict(solver), "train": asdict(cfg)}


def _next_batch(data_iter: Iterator, make_loader: Callable, iteration: int) -> tuple[Any, Iterator]:
    """Next batch; an exhausted (epoch-style) loader is restarted at the current iteration."""
    try:
        return next(data_iter), data_iter
    except StopIteration:  # the loader ends its own workers here (persistent ones are reused)
        pass
    fresh = open_training_iter(make_loader(iteration))
    try:
        return next(fresh), fresh
    except BaseException as exc:
        end_loader_workers(fresh)  # the caller never sees this iterator, so it cannot end it
        if isinstance(exc, StopIteration):
            raise RuntimeError(f"make_loader({iteration}) yielded no batch") from None
        raise


def _split_outputs(out: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Model outputs -> (losses: keys starting with "loss", metrics: other scalar entries)."""
    if not isinstance(out, Mapping):
        raise TypeError(f"model.forward(batch) must return a dict, got {type(out).__name__}")
    losses, metrics = {}, {}
    for key, value in out.items():
        if key.startswith("loss"):
            if not isinstance(value, torch.Tensor) or value.numel() != 1:
                raise ValueError(f"model output {key!r} must be a scalar tensor")
            losses[key] = value
        elif isinstance(value, torch.Tensor) and value.numel() == 1:
            metrics[key] = value.detach()
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics[key] = torch.tensor(float(value))
    if not losses:
        raise ValueError(f"model.forward(batch) returned no 'loss*' key (keys: {sorted(out)})")
    return losses, metrics


def _warn_uncovered(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    covered = {id(p) for g in optimizer.param_groups for p in g["params"]}
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in covered]
    if missing:
        logger.warning("%d trainable parameters are in no param group and will not be trained: %s",
                       len(missing), ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else ""))


def check_train_config(cfg: TrainConfig) -> None:
    """Settings that would crash later or silently do nothing, refused before any output."""
    if cfg.batch_size <= 0:
        raise ConfigError(f"train.batch_size={cfg.batch_size}: must be a positive number of images")
    if cfg.num_workers < 0:
        raise ConfigError(f"train.num_workers={cfg.num_workers}: must be >= 0")
    if cfg.keep_checkpoints < 0:
        raise ConfigError(f"train.keep_checkpoints={cfg.keep_checkpoints}: must be >= 0 (0 keeps all)")
    if not 0.0 <= cfg.max_skipped_fraction <= 1.0:
        raise ConfigError(f"train.max_skipped_fraction={cfg.max_skipped_fraction}: must be in [0, 1]")


def _prepare_model(model: nn.Module, cfg: TrainConfig, device: torch.device,
                   world_size: int) -> nn.Module:
    """Move to ``device`` and, when asked and possible, convert BatchNorm to SyncBatchNorm."""
    model.to(device)
    if cfg.sync_bn and world_size > 1:
        if device.type == "cuda":
            return nn.SyncBatchNorm.convert_sync_batchnorm(model)
        logger.warning("train.sync_bn ignored: SyncBatchNorm needs CUDA tensors (on %s)", device)
    return model


def train_step(model: nn.Module, batch: Any, optimizer, scheduler, scaler,
                amp_dtype: torch.dtype | None, clip_grad_norm: float,
                iteration: int) -> tuple[dict[str, float], dict[str, float], torch.Tensor | None]:
    """Forward, backward, (clip), step. Returns loss values, metric values and the grad norm.

    Loss values reach the host once per step, after backward is queued and before the weights
    change, so a non-finite loss stops the run without touching the model.
    """
    optimizer.zero_grad(set_to_none=True)
    device_type = next(model.parameters()).device.type
    autocast = (torch.autocast(device_type, dtype=amp_dtype) if amp_dtype is not None
                else contextlib.nullcontext())
    with autocast:
        losses, metrics = _split_outputs(model(batch))
    total = sum(v.float() for v in losses.values())
    scalars = torch.stack([total.detach()]
                          + [v.detach().float().reshape(()) for v in losses.values()]
                          + [v.float().reshape(()).to(total.device) for v in metrics.values()])
    scaler.scale(total).backward()
    values = scalars.cpu().tolist()
    loss_names = ["total_loss", *losses]
    loss_values = dict(zip(loss_names, values[: len(loss_names)]))
    if not math.isfinite(values[0]):
        named = ", ".join(f"{k}={v}" for k, v in loss_values.items())
        raise FloatingPointError(
            f"non-finite loss at iteration {iteration + 1} (batch {iteration} of make_loader): "
            f"{named}")
    grad_norm = None
    if clip_grad_norm > 0:
        if scaler.is_enabled():
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        grad_norm = torch.nn.utils.clip_grad_norm_(
            [p for g in optimizer.param_groups for p in g["params"]], clip_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    return loss_values, dict(zip(metrics, values[len(loss_names):])), grad_norm


def _unpack_batch(batch: Any, default_images: int) -> tuple[Any, int, list[list[str]], list[list]]:
    """(batch for the model, images in it, [path, reason] of images the dataset skipped,
    [url, reason, shards in its set] of shards it found damaged)."""
    if not isinstance(batch, Mapping):
        return batch, default_images, [], []
    skipped = [[str(p), str(r)] for p, r in batch.get("skipped", ()) or ()]
    shards = [[str(p), str(r), int(n)] for p, r, n in batch.get("damaged_shards", ()) or ()]
    num = batch.get("num_images")
    num_images = default_images if num is None else int(num)
    batch = {k: v for k, v in batch.items() if k not in ("skipped", "damaged_shards")}
    return batch, num_images, skipped, shards


class Trainer:
    """One run: the state hooks read, the step, the checkpoint and the loop.

    Built by :func:`train`; after setting up it holds ``model`` (the unwrapped module),
    ``optimizer``, ``scheduler``, ``writer``, ``cfg``, ``solver``, ``run_dir``, ``device``,
    ``rank``, ``world_size``, ``extra_state``, ``iteration``, ``start_iter``, ``max_iters`` and
    the last smoothed ``losses``/``metrics``: what hooks see."""

    def __init__(self, model: nn.Module, make_loader: Callable[[int], Iterable], solver: SolverConfig,
                 cfg: TrainConfig, extra_state: dict | None, param_groups, hooks: Iterable[Any],
                 config_dict: dict | None):
        check_solver(solver)
        check_train_config(cfg)
        where = launch(cfg.device)  # a no-op when the command's launch step already ran
        self.rank, self.world_size, self.device = where.rank, where.world_size, where.device
        self.cfg, self.solver, self.make_loader = cfg, solver, make_loader
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.config_dict = plain(config_dict if config_dict is not None else default_config_dict(solver, cfg))
        self.extra_state = plain(extra_state or {})
        self.hooks = [PeriodicWriter(cfg.log_period), PeriodicCheckpointer(cfg.checkpoint_period), *hooks]

        seed_everything(cfg.seed + self.rank)
        self.module = _prepare_model(model, cfg, self.device, self.world_size)
        self.model = unwrap_model(self.module)
        groups = param_groups(self.module) if callable(param_groups) else param_groups
        self.optimizer = build_optimizer(groups if groups is not None else self.module, solver)
        if groups is not None:
            _warn_uncovered(self.module, self.optimizer)
        self.scheduler = build_lr_scheduler(self.optimizer, solver)
        self.amp_dtype = AMP_DTYPES.get(solver.amp)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype is torch.float16)
        self.ledger = SkipLedger(self.run_dir, cfg.max_skipped_fraction)
        self.meters = Meters()
        self.start_iter = self.iteration = 0
        self.max_iters = solver.max_iters
        self.losses: dict[str, float] = {}
        self.metrics: dict[str, float] = {}
        self.grad_norm = None
        self.last_saved: Path | None = None
        self.finished: TrainResult | None = None  # set when the folder holds a finished run
        self.rng_states = None
        self._resume()

    # ------------------------------------------------------------------ set-up

    def _resume(self) -> None:
        cfg, main = self.cfg, self.rank == 0
        if main:
            for stale in remove_stale_temp_files(self.ckpt_dir):
                logger.info("removed %s, left by an interrupted checkpoint write", stale)
        if not cfg.resume and main and latest_checkpoint(self.run_dir) is not None:
            logger.warning("%s holds checkpoints of an earlier run; starting over (train.resume=false)",
                           self.run_dir)
        resumed = load_resume_checkpoint(self.run_dir, self.config_dict, self.extra_state) if cfg.resume else None
        if resumed is None:
            return
        path, ckpt = resumed
        self.model.load_state_dict(ckpt["model"])
        self.start_iter = self.iteration = int(ckpt["iteration"])
        self.ledger = SkipLedger(self.run_dir, cfg.max_skipped_fraction, ckpt)
        if self.start_iter >= self.max_iters:
            logger.info("run in %s already finished at iteration %d", self.run_dir, self.start_iter)
            final = self.ckpt_dir / "model_final.pth"
            if not final.is_file() and self.rank == 0:  # killed between its last checkpoint and this file
                save_checkpoint(final, {"model": self.model.state_dict(), "iteration": self.start_iter,
                                        "config": self.config_dict, "extra_state": self.extra_state})
            self.finished = TrainResult(self.start_iter, dict(ckpt.get("losses", {})), len(self.ledger.skipped),
                                        self.run_dir, path, dict(ckpt.get("metrics", {})),
                                        final if final.is_file() else None)
            return
        restore_training_state(ckpt, self.optimizer, self.scheduler, self.scaler, self.solver)
        self.rng_states = ckpt.get("rng")
        logger.info("resumed from %s at iteration %d", path, self.start_iter)

    # ------------------------------------------------------------------ what hooks call

    def record(self, iteration: int) -> dict:
        """The smoothed record of ``iteration`` (a collective), also kept as ``losses``/``metrics``."""
        record = metrics_record(iteration, self.max_iters, self.solver, summarize(self.meters, self.world_size))
        if self.grad_norm is not None:
            record["metrics"]["grad_norm"] = float(self.grad_norm)
        self.losses, self.metrics = record["losses"], record["metrics"]
        return record

    def save_checkpoint(self) -> Path:
        """Collective: every rank's RNG state and skipped images go into rank 0's file."""
        rng = all_gather_object(capture_rng_state())
        self.ledger.merge()
        summary = summarize(self.meters, self.world_size)
        path = self.ckpt_dir / f"checkpoint_{self.iteration:07d}.pth"
        save_checkpoint(path, {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng,
            "iteration": self.iteration,
            "world_size": self.world_size,
            "config": self.config_dict,
            "extra_state": self.extra_state,
            "losses": summary["losses"],
            "metrics": summary["metrics"],
            **self.ledger.state(),
        })
        write_last_checkpoint(path)
        prune_checkpoints(self.ckpt_dir, self.cfg.keep_checkpoints)
        self.ledger.write()
        barrier()  # no rank runs ahead of a checkpoint that is not on disk yet
        self.last_saved = path
        return path

    # ------------------------------------------------------------------ the loop

    def run(self) -> TrainResult:
        if self.finished is not None:
            return self.finished
        cfg, solver = self.cfg, self.solver
        module = self.module
        if self.world_size > 1:
            module = nn.parallel.DistributedDataParallel(
                self.module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=cfg.find_unused_parameters)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:
            atomic_write(self.run_dir / "config.yaml",
                         lambda f: yaml.safe_dump(self.config_dict, f, sort_keys=False), mode="w")
            truncate_metrics(self.run_dir / METRICS_FILE, self.start_iter)
        self.writer = MetricsWriter(self.run_dir, enabled=self.rank == 0,
                                    purge_step=self.start_iter + 1 if self.start_iter else None)

        # The loader and before_train hooks may draw random numbers (e.g. DataLoader base seeds);
        # restoring the saved RNG states after them keeps the training streams exact on resume.
        stop = StopSignals().__enter__()  # left in the finally below, or here if the loader fails
        data_iter = None
        try:
            data_iter = open_training_iter(self.make_loader(self.start_iter))
            call_hooks(self.hooks, "before_train", self)
        except BaseException:
            end_loader_workers(data_iter)
            stop.__exit__(None, None, None)
            raise
        restore_rank_rng(self.rng_states, self.rank, self.world_size)

        self.model.train()
        bar = tqdm(total=self.max_iters, initial=self.start_iter, disable=not (self.rank == 0 and cfg.progress),
                   dynamic_ncols=True, desc="train")
        steps = 0
        try:
            while self.iteration < self.max_iters:
                t0 = time.perf_counter()
                batch, data_iter = _next_batch(data_iter, self.make_loader, self.iteration)
                steps += self._step(module, batch, t0)
                self.iteration += 1
                bar.update(1)
                if not bar.disable:
                    bar.set_postfix(progress_postfix(self.meters, lr_at(self.iteration - 1, solver)), refresh=False)
                with rng_preserved():
                    call_hooks(self.hooks, "after_step", self)
                self.model.train()
                if self.iteration < self.max_iters and (signum := stop.requested(self.world_size)):
                    raise Preempted(signum, self.iteration, self.max_iters, self.save_checkpoint())
            result = self._finish(steps)
            bar.close()
            call_hooks(self.hooks, "after_train", self)
        finally:
            stop.__exit__(None, None, None)
            # end the workers here, not when the iterator is collected: they ignore SIGTERM, and a
            # traceback (of this run's error) can keep the iterator alive until after exit's terminate
            end_loader_workers(data_iter)
            bar.close()
            self.writer.close()
        return result

    def _step(self, module: nn.Module, batch: Any, t0: float) -> int:
        """One iteration's batch: counted, then a step on every rank or, when any rank's batch
        was empty, on none (DDP needs every rank in every backward). Returns the steps taken."""
        data_time = time.perf_counter() - t0
        batch, num_images, skipped, damaged = _unpack_batch(batch, self.cfg.batch_size)
        # the same collective sums the reads, so every rank judges them alike
        if self.ledger.count(num_images, skipped, damaged):
            logger.debug("iteration %d: empty batch, no step", self.iteration + 1)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "scheduler before optimizer"
                self.scheduler.step()
            return 0
        losses, metrics, self.grad_norm = train_step(
            module, move_to_device(batch, self.device), self.optimizer, self.scheduler, self.scaler,
            self.amp_dtype, self.solver.clip_grad_norm, self.iteration)
        meters = self.meters
        meters.update(meters.losses, losses)
        meters.update(meters.metrics, metrics)
        meters.iter_time.update(time.perf_counter() - t0)
        meters.data_time.update(data_time)
        meters.images.update(num_images)
        return 1

    def _finish(self, steps: int) -> TrainResult:
        """The last checkpoint, ``model_final.pth`` and the final record."""
        ledger, main = self.ledger, self.rank == 0
        ledger.check_images(final=True)
        if steps == 0 and self.start_iter == 0:
            ledger.merge()
            raise DataError(f"no optimizer step in {self.iteration} iteration(s): every batch was empty "
                            f"(all {ledger.reads[1]} image reads failed, e.g. {ledger.examples()}"
                            "); check the data paths")
        self.save_checkpoint()
        final_model = self.ckpt_dir / "model_final.pth"
        save_checkpoint(final_model, {"model": self.model.state_dict(), "iteration": self.iteration,
                                      "config": self.config_dict, "extra_state": self.extra_state})
        record = self.record(self.iteration)
        record.update(eta_s=0.0, skipped=len(ledger.skipped), final=True)
        self.writer.write(record)
        if main:
            logger.info(log_line(record, self.max_iters))
        if ledger.skipped:
            if main:
                logger.warning("%d image(s) could not be read and were skipped (%d of %d reads), "
                               "%d damaged shard(s) cut short; list in %s", ledger.num_images,
                               ledger.reads[1], ledger.reads[0], len(ledger.damaged),
                               self.run_dir / "skipped.jsonl")
        elif main:
            logger.info("finished at iteration %d; 0 images skipped", self.iteration)
        return TrainResult(self.iteration, record["losses"], len(ledger.skipped), self.run_dir, self.last_saved,
                           record["metrics"], final_model)


def train(
    model: nn.Module,
    make_loader: Callable[[int], Iterable],
    solver: SolverConfig,
    cfg: TrainConfig,
    extra_state: dict | None = None,
    param_groups: list[dict] | Callable[[nn.Module], list[dict]] | None = None,
    hooks: Iterable[Any] = (),
    config_dict: dict | None = None,
) -> TrainResult:
    """Train ``model`` for ``solver.max_iters`` iterations over ``make_loader(start_iter)``.

    ``model(batch)`` returns a dict: ``loss*`` entries are summed and minimised, other scalars
    are logged. ``param_groups`` (or a function of the model returning them) overrides the
    default norm/bias-aware groups, e.g. to give a head an ``lr_mult``. ``extra_state``
    (plain data, e.g. a label vocabulary) and ``config_dict`` are saved in every checkpoint
    and must match on resume. Hooks run on every rank (``predet.engine.hooks``). The process
    group is the launch step's (``predet.engine.launch.launched``), which also ends it.
    """
    return Trainer(model, make_loader, solver, cfg, extra_state, param_groups, list(hooks), config_dict).run()
