"""The training loop shared by pre-training and fine-tuning.

One plain function, :func:`train`, in the spirit of torchvision's references/detection loop,
with Detectron2-style hooks for what differs between callers (evaluation, extra logging).

Iteration numbers count completed optimizer steps: ``checkpoint_0000020.pth`` holds the state
after 20 steps, and resuming from it calls ``make_loader(20)``, whose first batch is the 21st.
A run that is interrupted and resumed ends with the same weights, bit for bit on CPU, as one
that was not: model, optimizer, scheduler, grad scaler and every rank's RNG states are saved,
and the caller's loader is deterministic in the iteration.
"""

from __future__ import annotations

import contextlib
import itertools
import json
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

from ..config import RUN_ONLY_KEYS, ConfigError, SolverConfig, TrainConfig, flatten
from ..errors import CheckpointError, DataError, UserError
from .checkpoint import (
    atomic_write,
    capture_rng_state,
    checkpoint_candidates,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    remove_stale_temp_files,
    restore_rng_state,
    save_checkpoint,
    write_last_checkpoint,
)
from .distributed import (
    move_to_device,
    all_gather_object,
    all_reduce_mean,
    all_reduce_sum_ints,
    barrier,
    is_main_process,
    unwrap_model,
)
from .launch import launch, resolve_device
from .preemption import Preempted, StopSignals
from .metrics import METRICS_FILE, MetricsWriter, SmoothedValue, format_eta, truncate_metrics
from .optim import build_lr_scheduler, build_optimizer, check_solver, lr_at, lr_factor

logger = logging.getLogger("predet.engine")

from .optim import AMP_DTYPES

# Keys (matched as a dotted suffix) that may change between a run and its resumption: they
# do not change what is trained. ``solver.max_iters`` may also grow (checked separately).
RESUME_IGNORED_KEYS = RUN_ONLY_KEYS
# The skipped-image fraction is judged once this many images were read (or at the end).
MIN_READS_TO_JUDGE = 100
RESUME_GROWABLE_KEYS = ("solver.max_iters",)


class ResumeError(UserError):
    """The run directory holds a checkpoint of a differently configured run."""


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


@dataclass
class TrainerState:
    """What hooks see. ``model`` is the unwrapped module (not DDP); ``iteration`` counts steps."""

    iteration: int
    start_iter: int
    max_iters: int
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    writer: MetricsWriter
    cfg: TrainConfig
    solver: SolverConfig
    run_dir: Path
    device: torch.device
    rank: int
    world_size: int
    extra_state: dict
    losses: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


# ----------------------------------------------------------------------------- small helpers


def seed_everything(seed: int) -> None:
    """Seed python, NumPy and torch (all devices) so a run is repeatable."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _plain(obj: Any) -> Any:
    """Config-like data as YAML- and weights_only-safe builtins (tuples -> lists, Path -> str)."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    return obj


def _key_in(key: str, names: Iterable[str]) -> bool:
    return any(key == n or key.endswith("." + n) for n in names)


def config_differences(saved: Mapping, current: Mapping) -> list[str]:
    """Human-readable differences between two config dicts that forbid resuming."""
    a, b = flatten(_plain(saved)), flatten(_plain(current))
    missing = "<absent>"
    diffs = []
    for key in sorted(set(a) | set(b)):
        if _key_in(key, RESUME_IGNORED_KEYS):
            continue
        old, new = a.get(key, missing), b.get(key, missing)
        if old == new:
            continue
        if (_key_in(key, RESUME_GROWABLE_KEYS) and isinstance(old, (int, float))
                and isinstance(new, (int, float)) and new >= old):
            continue
        diffs.append(f"{key}: saved {_short(old)}, now {_short(new)}")
    return diffs


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def default_config_dict(solver: SolverConfig, cfg: TrainConfig) -> dict:
    return {"solver": asdict(solver), "train": asdict(cfg)}


@contextlib.contextmanager
def _rng_preserved():
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


def _call_hooks(hooks: Iterable[Any], name: str, state: TrainerState) -> None:
    for hook in hooks:
        fn = getattr(hook, name, None)
        if fn is not None:
            fn(state)


def _next_batch(data_iter: Iterator, make_loader: Callable, iteration: int) -> tuple[Any, Iterator]:
    """Next batch; an exhausted (epoch-style) loader is restarted at the current iteration."""
    try:
        return next(data_iter), data_iter
    except StopIteration:
        data_iter = iter(make_loader(iteration))
        try:
            return next(data_iter), data_iter
        except StopIteration:
            raise RuntimeError(f"make_loader({iteration}) yielded no batch") from None


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


def _write_skipped(run_dir: Path, skipped: dict[str, str]) -> None:
    """``skipped.jsonl`` when there is something to list (or an older list to bring up to date)."""
    if is_main_process() and (skipped or (run_dir / "skipped.jsonl").exists()):
        atomic_write(run_dir / "skipped.jsonl", lambda f: f.writelines(
            json.dumps({"path": p, "reason": r}) + "\n" for p, r in skipped.items()), mode="w")


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


class _SkipLedger:
    """What could not be read, over all ranks: unreadable images (with the image reads, to
    judge their fraction) and damaged shards (against the shards of their data set).

    ``pending`` holds this rank's entries until a collective merges them into ``skipped``
    (path -> reason), the list ``skipped.jsonl`` and the checkpoints keep."""

    def __init__(self, run_dir: Path, limit: float, state: Mapping | None = None):
        state = state or {}
        self.run_dir, self.limit = run_dir, limit
        self.skipped = {str(p): str(r) for p, r in state.get("skipped", [])}
        self.reads = [int(v) for v in state.get("image_reads", [0, 0])]  # image reads, failed
        self.damaged = {str(p): int(n) for p, n in state.get("damaged_shards", [])}  # url -> shards
        self.pending: list[list] = []  # [path, reason, shards of its set (0 for an image)]

    def state(self) -> dict:
        return {"skipped": [[p, r] for p, r in self.skipped.items()], "image_reads": list(self.reads),
                "damaged_shards": [[p, n] for p, n in self.damaged.items()]}

    def count(self, num_images: int, images: list, shards: list) -> int:
        """One step's reads, summed over ranks (a collective: every rank calls it every step);
        stops the run past the limits. Returns the number of ranks whose batch was empty."""
        self.pending += [[p, r, 0] for p, r in images] + [[p, r, int(n)] for p, r, n in shards]
        empties, step_reads, step_failed, step_shards = all_reduce_sum_ints(
            [num_images == 0, num_images + len(images), len(images), len(shards)])
        self.reads[0] += step_reads
        self.reads[1] += step_failed
        if step_shards:
            self.merge()
            self.check_shards()
        self.check_images(final=False)
        return empties

    def merge(self) -> None:
        """Collective: every rank's pending entries into ``skipped`` on every rank."""
        for part in all_gather_object(self.pending):
            for path, reason, shards in part:
                self.skipped.setdefault(path, reason)
                if shards:
                    self.damaged[path] = shards
        self.pending = []

    def write(self) -> None:
        _write_skipped(self.run_dir, self.skipped)

    def examples(self, n: int = 3) -> str:
        shown = "; ".join(f"{p} ({r[:80]})" for p, r in itertools.islice(self.skipped.items(), n))
        return shown + (f"; ... {len(self.skipped) - n} more" if len(self.skipped) > n else "")

    def check_images(self, final: bool) -> None:
        """Stop when more than ``limit`` of the image reads failed (judged once enough were read;
        ``reads`` are summed over ranks, so every rank judges alike)."""
        reads, failed = self.reads
        if reads == 0 or (reads < MIN_READS_TO_JUDGE and not final) or failed <= self.limit * reads:
            return
        self.merge()
        self.write()
        raise DataError(
            f"{failed} of {reads} image reads failed ({failed / reads:.0%}, more than "
            f"train.max_skipped_fraction={self.limit:g}): {self.num_images} unreadable image(s), e.g. "
            f"{self.examples()}. Fix the image paths/files (list in "
            f"{self.run_dir / 'skipped.jsonl'}) or raise train.max_skipped_fraction")

    def check_shards(self) -> None:
        """Stop when more than ``limit`` of the data set's shards turned out damaged."""
        total = max(self.damaged.values(), default=0)
        if not self.damaged or len(self.damaged) <= self.limit * total:
            return
        self.write()
        shown = "; ".join(f"{p} ({self.skipped[p][:80]})" for p in itertools.islice(self.damaged, 3))
        raise DataError(
            f"{len(self.damaged)} of {total} shards are damaged (more than "
            f"train.max_skipped_fraction={self.limit:g} of them), e.g. {shown}. Rewrite or replace "
            f"them (list in {self.run_dir / 'skipped.jsonl'}) or raise train.max_skipped_fraction")

    @property
    def num_images(self) -> int:
        return len(self.skipped) - len(self.damaged)


# ----------------------------------------------------------------------------- the loop


class _Meters:
    """Windowed losses, metrics and timings of this rank."""

    def __init__(self, window: int = 20):
        self.window = window
        self.losses: dict[str, SmoothedValue] = {}
        self.metrics: dict[str, SmoothedValue] = {}
        self.iter_time = SmoothedValue(window)
        self.data_time = SmoothedValue(window)
        self.images = SmoothedValue(window)

    def update(self, group: dict[str, SmoothedValue], values: dict[str, float]) -> None:
        for k, v in values.items():
            group.setdefault(k, SmoothedValue(self.window)).update(v)

    def local_summary(self) -> dict[str, float]:
        out = {f"losses/{k}": m.median for k, m in self.losses.items()}
        out.update({f"metrics/{k}": m.median for k, m in self.metrics.items()})
        t = self.iter_time.avg if self.iter_time.count else math.nan
        out["time"] = t
        out["data_time"] = self.data_time.avg if self.data_time.count else math.nan
        out["images_per_s"] = self.images.avg / t if self.iter_time.count and t > 0 else math.nan
        return out


def _summary(meters: _Meters, world_size: int) -> dict[str, Any]:
    """Smoothed values averaged over ranks (a collective: every rank must call it)."""
    flat = all_reduce_mean(meters.local_summary())
    losses = {k.split("/", 1)[1]: v for k, v in flat.items() if k.startswith("losses/")}
    metrics = {k.split("/", 1)[1]: v for k, v in flat.items() if k.startswith("metrics/")}
    return {"losses": losses, "metrics": metrics, "time": flat["time"],
            "data_time": flat["data_time"], "images_per_s": flat["images_per_s"] * world_size}


def _record(iteration: int, max_iters: int, solver: SolverConfig, summary: dict) -> dict:
    eta = summary["time"] * (max_iters - iteration) if math.isfinite(summary["time"]) else None
    return {
        "iteration": iteration,
        "lr": lr_at(max(iteration - 1, 0), solver),
        "losses": summary["losses"],
        "metrics": summary["metrics"],
        "images_per_s": summary["images_per_s"],
        "eta_s": eta,
        "time": summary["time"],
        "data_time": summary["data_time"],
        "timestamp": time.time(),
    }


def _postfix(meters: _Meters, lr: float) -> dict[str, str]:
    post = {k.removeprefix("loss_") if k != "total_loss" else "loss": f"{m.median:.4g}"
            for k, m in meters.losses.items()}
    t = meters.iter_time.avg
    if meters.iter_time.count and t > 0:
        post["img/s"] = f"{meters.images.avg / t:.1f}"
    post["lr"] = f"{lr:.3g}"
    return post


def _prepare_model(model: nn.Module, cfg: TrainConfig, device: torch.device,
                   world_size: int) -> nn.Module:
    """Move to ``device`` and, when asked and possible, convert BatchNorm to SyncBatchNorm."""
    model.to(device)
    if cfg.sync_bn and world_size > 1:
        if device.type == "cuda":
            return nn.SyncBatchNorm.convert_sync_batchnorm(model)
        logger.warning("train.sync_bn ignored: SyncBatchNorm needs CUDA tensors (on %s)", device)
    return model


def _load_newest_loadable(run_dir: Path) -> tuple[Path, dict] | None:
    """The newest checkpoint of ``run_dir`` that loads; damaged newer ones are named and
    skipped. None only when the folder holds no checkpoint at all: a run never starts over
    while one exists."""
    candidates = checkpoint_candidates(run_dir)
    if not candidates:
        return None
    problems = []
    for path in candidates:
        try:
            ckpt = load_checkpoint(path)
        except CheckpointError as exc:
            logger.warning("skipping checkpoint %s: %s", path, exc)
            problems.append(f"{path.name}: {exc}")
            continue
        if "iteration" not in ckpt or "optimizer" not in ckpt:
            logger.warning("skipping checkpoint %s: not a training checkpoint", path)
            problems.append(f"{path.name}: not a training checkpoint")
            continue
        if problems:
            logger.warning("resuming from %s (the newer %d checkpoint(s) could not be loaded)",
                           path.name, len(problems))
        return path, ckpt
    raise CheckpointError(
        f"{run_dir} holds {len(candidates)} checkpoint(s) and none loads ({'; '.join(problems)}); "
        "refusing to start over on top of them: move them away or use a new train.run_dir")


def _load_resume_checkpoint(run_dir: Path, config_dict: dict,
                            extra_state: dict) -> tuple[Path, dict] | None:
    """The newest loadable checkpoint of ``run_dir``, after checking it is this run's."""
    found = _load_newest_loadable(run_dir)
    if found is None:
        logger.info("train.resume: no checkpoint in %s, starting from scratch", run_dir)
        return None
    path, ckpt = found
    diffs = config_differences(ckpt.get("config", {}), config_dict)
    diffs += config_differences({"extra_state": ckpt.get("extra_state", {})},
                                {"extra_state": extra_state})
    if diffs:
        raise ResumeError(
            f"refusing to resume from {path}: the configuration differs from the saved one in:\n  "
            + "\n  ".join(diffs)
            + "\nUse a new train.run_dir, or train.resume=false to start this one over."
        )
    return path, ckpt


def _restore_training_state(ckpt: dict, optimizer, scheduler, scaler, solver: SolverConfig) -> None:
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    # A grown max_iters changes a cosine schedule: set this iteration's lr from the new one.
    for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = base * lr_factor(scheduler.last_epoch, solver)
    if scaler.is_enabled() and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])


def _restore_rank_rng(rng_states: list | None, rank: int, world_size: int) -> None:
    if rng_states is None:
        return
    if len(rng_states) == world_size:
        restore_rng_state(rng_states[rank])
    else:
        logger.warning("checkpoint has RNG states of %d ranks, this run has %d: not restored",
                       len(rng_states), world_size)


def _train_step(model: nn.Module, batch: Any, optimizer, scheduler, scaler,
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


def _log_line(record: dict, max_iters: int) -> str:
    losses = "  ".join(f"{k} {v:.4g}" for k, v in record["losses"].items())
    return (f"iter {record['iteration']}/{max_iters}  {losses}  lr {record['lr']:.4g}  "
            f"{record['images_per_s']:.1f} img/s  eta {format_eta(record['eta_s'])}")


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
    and must match on resume. Hooks run on every rank. In a distributed run the caller ends
    with ``cleanup()``.
    """
    hooks = list(hooks)
    check_solver(solver)
    check_train_config(cfg)
    where = launch(cfg.device)  # a no-op when the command's launch step already ran
    rank, world_size, device = where.rank, where.world_size, where.device
    main = rank == 0
    run_dir = Path(cfg.run_dir)
    ckpt_dir = run_dir / "checkpoints"
    if config_dict is None:
        config_dict = default_config_dict(solver, cfg)
    config_dict = _plain(config_dict)
    extra_state = _plain(extra_state or {})

    seed_everything(cfg.seed + rank)
    model = _prepare_model(model, cfg, device, world_size)
    groups = param_groups(model) if callable(param_groups) else param_groups
    optimizer = build_optimizer(groups if groups is not None else model, solver)
    if groups is not None:
        _warn_uncovered(model, optimizer)
    scheduler = build_lr_scheduler(optimizer, solver)
    amp_dtype = AMP_DTYPES.get(solver.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)

    start_iter, rng_states = 0, None
    ledger = _SkipLedger(run_dir, cfg.max_skipped_fraction)
    if main:
        for stale in remove_stale_temp_files(ckpt_dir):
            logger.info("removed %s, left by an interrupted checkpoint write", stale)
    if not cfg.resume and main and latest_checkpoint(run_dir) is not None:
        logger.warning("%s holds checkpoints of an earlier run; starting over (train.resume=false)",
                       run_dir)
    resumed = _load_resume_checkpoint(run_dir, config_dict, extra_state) if cfg.resume else None
    if resumed is not None:
        resume_from, ckpt = resumed
        unwrap_model(model).load_state_dict(ckpt["model"])
        start_iter = int(ckpt["iteration"])
        ledger = _SkipLedger(run_dir, cfg.max_skipped_fraction, ckpt)
        if start_iter >= solver.max_iters:
            logger.info("run in %s already finished at iteration %d", run_dir, start_iter)
            final = ckpt_dir / "model_final.pth"
            return TrainResult(start_iter, dict(ckpt.get("losses", {})), len(ledger.skipped), run_dir,
                               resume_from, dict(ckpt.get("metrics", {})),
                               final if final.is_file() else None)
        _restore_training_state(ckpt, optimizer, scheduler, scaler, solver)
        rng_states = ckpt.get("rng")
        logger.info("resumed from %s at iteration %d", resume_from, start_iter)
        del ckpt, resumed

    ddp_model = model
    if world_size > 1:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=cfg.find_unused_parameters)

    run_dir.mkdir(parents=True, exist_ok=True)
    if main:
        atomic_write(run_dir / "config.yaml",
                     lambda f: yaml.safe_dump(config_dict, f, sort_keys=False), mode="w")
        truncate_metrics(run_dir / METRICS_FILE, start_iter)
    writer = MetricsWriter(run_dir, enabled=main, purge_step=start_iter + 1 if start_iter else None)
    state = TrainerState(start_iter, start_iter, solver.max_iters, unwrap_model(model), optimizer,
                         scheduler, writer, cfg, solver, run_dir, device, rank, world_size,
                         extra_state)

    # The loader and before_train hooks may draw random numbers (e.g. DataLoader base seeds);
    # restoring the saved RNG states after them keeps the training streams exact on resume.
    stop = StopSignals().__enter__()  # left in the finally below, or here if the loader fails
    try:
        data_iter = iter(make_loader(start_iter))
        _call_hooks(hooks, "before_train", state)
    except BaseException:
        stop.__exit__(None, None, None)
        raise
    _restore_rank_rng(rng_states, rank, world_size)

    meters = _Meters()
    last_saved: Path | None = None
    final_model: Path | None = None
    grad_norm = None
    iteration = start_iter
    model.train()
    bar = tqdm(total=solver.max_iters, initial=start_iter, disable=not (main and cfg.progress),
               dynamic_ncols=True, desc="train")

    def summary_record(it: int) -> dict:
        record = _record(it, solver.max_iters, solver, _summary(meters, world_size))
        if grad_norm is not None:
            record["metrics"]["grad_norm"] = float(grad_norm)
        state.losses, state.metrics = record["losses"], record["metrics"]
        return record

    def save(it: int) -> Path:
        """Collective: every rank's RNG state and skipped images go into rank 0's file."""
        rng = all_gather_object(capture_rng_state())
        ledger.merge()
        summary = _summary(meters, world_size)
        path = ckpt_dir / f"checkpoint_{it:07d}.pth"
        save_checkpoint(path, {
            "model": unwrap_model(model).state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": rng,
            "iteration": it,
            "world_size": world_size,
            "config": config_dict,
            "extra_state": extra_state,
            "losses": summary["losses"],
            "metrics": summary["metrics"],
            **ledger.state(),
        })
        write_last_checkpoint(path)
        prune_checkpoints(ckpt_dir, cfg.keep_checkpoints)
        ledger.write()
        barrier()  # no rank runs ahead of a checkpoint that is not on disk yet
        return path

    steps = 0
    try:
        while iteration < solver.max_iters:
            t0 = time.perf_counter()
            batch, data_iter = _next_batch(data_iter, make_loader, iteration)
            data_time = time.perf_counter() - t0
            batch, num_images, skipped, damaged = _unpack_batch(batch, cfg.batch_size)
            # DDP needs every rank in every backward: skip the step everywhere or nowhere.
            # The same collective sums the reads, so every rank judges them alike.
            empties = ledger.count(num_images, skipped, damaged)
            if empties:
                logger.debug("iteration %d: empty batch, no step", iteration + 1)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)  # "scheduler before optimizer"
                    scheduler.step()
            else:
                loss_values, metric_values, grad_norm = _train_step(
                    ddp_model, move_to_device(batch, device), optimizer, scheduler, scaler,
                    amp_dtype, solver.clip_grad_norm, iteration)
                meters.update(meters.losses, loss_values)
                meters.update(meters.metrics, metric_values)
                meters.iter_time.update(time.perf_counter() - t0)
                meters.data_time.update(data_time)
                meters.images.update(num_images)
                steps += 1
            iteration += 1
            state.iteration = iteration
            bar.update(1)
            if not bar.disable:
                bar.set_postfix(_postfix(meters, lr_at(iteration - 1, solver)), refresh=False)

            ongoing = iteration < solver.max_iters
            if cfg.log_period > 0 and iteration % cfg.log_period == 0 and ongoing:
                record = summary_record(iteration)
                writer.write(record)
                if main and not cfg.progress:
                    logger.info(_log_line(record, solver.max_iters))
            if cfg.checkpoint_period > 0 and iteration % cfg.checkpoint_period == 0 and ongoing:
                last_saved = save(iteration)
            if hooks:
                with _rng_preserved():
                    _call_hooks(hooks, "after_step", state)
                model.train()
            if ongoing and (signum := stop.requested(world_size)):
                last_saved = save(iteration)
                raise Preempted(signum, iteration, solver.max_iters, last_saved)

        ledger.check_images(final=True)
        if steps == 0 and start_iter == 0:
            ledger.merge()
            raise DataError(f"no optimizer step in {iteration} iteration(s): every batch was empty "
                            f"(all {ledger.reads[1]} image reads failed, e.g. {ledger.examples()}"
                            "); check the data paths")
        last_saved = save(iteration)
        final_model = ckpt_dir / "model_final.pth"
        save_checkpoint(final_model, {"model": unwrap_model(model).state_dict(),
                                      "iteration": iteration, "config": config_dict,
                                      "extra_state": extra_state})
        record = summary_record(iteration)
        record.update(eta_s=0.0, skipped=len(ledger.skipped), final=True)
        writer.write(record)
        bar.close()
        if main:
            logger.info(_log_line(record, solver.max_iters))
        if ledger.skipped:
            if main:
                logger.warning("%d image(s) could not be read and were skipped (%d of %d reads), "
                               "%d damaged shard(s) cut short; list in %s", ledger.num_images,
                               ledger.reads[1], ledger.reads[0], len(ledger.damaged),
                               run_dir / "skipped.jsonl")
        elif main:
            logger.info("finished at iteration %d; 0 images skipped", iteration)
        _call_hooks(hooks, "after_train", state)
    finally:
        stop.__exit__(None, None, None)
        # drop the loader here, not when the traceback goes: its workers ignore SIGTERM, so they
        # must be shut down by the loader itself, not terminated at exit
        data_iter = None  # noqa: F841
        bar.close()
        writer.close()

    return TrainResult(iteration, record["losses"], len(ledger.skipped), run_dir, last_saved,
                       record["metrics"], final_model)
