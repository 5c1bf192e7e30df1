"""Resuming a run: the newest checkpoint that loads (damaged newer ones named and skipped), the
check that it is this run's (same config but for run-only keys), and the optimizer, scheduler,
scaler and per-rank RNG states put back, so a resumed run ends bit for bit where an
uninterrupted one would."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from predet.checkpoint.io import (
    checkpoint_candidates,
    load_checkpoint,
    restore_rng_state,
)
from predet.config import SolverConfig, flatten, run_only
from predet.engine.optim import lr_factor
from predet.errors import CheckpointError, UserError

logger = logging.getLogger("predet.engine")


# Run-only keys (``predet.config.run_only``) may change between a run and its resumption: they
# do not change what is trained. ``solver.max_iters`` may also grow (checked separately).

RESUME_GROWABLE_KEYS = ("solver.max_iters",)


class ResumeError(UserError):
    """The run directory holds a checkpoint of a differently configured run."""


def plain(obj: Any) -> Any:
    """Config-like data as YAML- and weights_only-safe builtins (tuples -> lists, Path -> str)."""
    if isinstance(obj, Mapping):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
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
    a, b = flatten(plain(saved)), flatten(plain(current))
    missing = "<absent>"
    diffs = []
    for key in sorted(set(a) | set(b)):
        if run_only(key):
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


def load_resume_checkpoint(run_dir: Path, config_dict: dict,
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


def restore_training_state(ckpt: dict, optimizer, scheduler, scaler, solver: SolverConfig) -> None:
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    # A grown max_iters changes a cosine schedule: set this iteration's lr from the new one.
    for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = base * lr_factor(scheduler.last_epoch, solver)
    if scaler.is_enabled() and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])


def restore_rank_rng(rng_states: list | None, rank: int, world_size: int) -> None:
    if rng_states is None:
        return
    if len(rng_states) == world_size:
        restore_rng_state(rng_states[rank])
    else:
        logger.warning("checkpoint has RNG states of %d ranks, this run has %d: not restored",
                       len(rng_states), world_size)
