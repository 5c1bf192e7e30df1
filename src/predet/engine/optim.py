"""SGD with the detection-standard parameter groups and warmup + step/cosine schedules.

Every group carries an ``lr_mult``: its learning rate is ``solver.lr * lr_mult`` at all times,
because the schedule is one multiplicative factor (LambdaLR) applied to each group's base lr.
Fine-tuning uses this for the mask head's ``lr_mf``.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from predet.config import ConfigError, SolverConfig
from predet.config.choices import LR_SCHEDULES

# Autocast dtypes of ``solver.amp``: bf16 runs on CUDA and on the CPU (torch's CPU autocast);
# fp16 needs a GradScaler against underflowing gradients.
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

NORM_TYPES: tuple[type, ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def check_solver(solver: SolverConfig) -> None:
    """Reject schedules that would silently do something else than asked."""
    if solver.schedule not in LR_SCHEDULES:
        raise ConfigError(f"solver.schedule must be one of {LR_SCHEDULES}, got {solver.schedule!r}")
    if list(solver.milestones) != sorted(solver.milestones):
        raise ConfigError(f"solver.milestones must be increasing, got {solver.milestones}")
    if solver.max_iters <= 0:
        raise ConfigError(f"solver.max_iters={solver.max_iters}: a run must take at least one step; "
                          "set solver.max_iters to a positive number")
    if solver.warmup_iters < 0:
        raise ConfigError(f"solver.warmup_iters={solver.warmup_iters}: must be >= 0")
    if solver.amp not in ("none", *AMP_DTYPES):
        raise ConfigError(f"solver.amp={solver.amp!r}: choose none, bf16 or fp16")


def lr_factor(iteration: int, solver: SolverConfig) -> float:
    """Multiplier of the base lr for the step that runs at ``iteration`` (0-based).

    Linear warmup from ``warmup_factor`` to 1 over ``warmup_iters`` multiplies the main schedule:
    ``gamma ** (number of milestones <= iteration)`` or a half cosine reaching 0 at ``max_iters``.
    """
    if solver.schedule == "step":
        factor = solver.gamma ** bisect.bisect_right(solver.milestones, iteration)
    elif solver.schedule == "cosine":
        progress = min(iteration, solver.max_iters) / max(solver.max_iters, 1)
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"solver.schedule must be one of {LR_SCHEDULES}, got {solver.schedule!r}")
    if iteration < solver.warmup_iters:
        alpha = iteration / solver.warmup_iters
        factor *= solver.warmup_factor * (1.0 - alpha) + alpha
    return factor


def lr_at(iteration: int, solver: SolverConfig, lr_mult: float = 1.0) -> float:
    """Learning rate of a group with ``lr_mult`` at ``iteration`` (what the scheduler sets)."""
    return solver.lr * lr_mult * lr_factor(iteration, solver)


def _match_mult(name: str, lr_mults: Mapping[str, float]) -> tuple[str | None, float]:
    """Longest module-name prefix of ``name`` found in ``lr_mults`` (dotted-boundary match)."""
    best = None
    for prefix in lr_mults:
        if name == prefix or name.startswith(prefix + "."):
            if best is None or len(prefix) > len(best):
                best = prefix
    return best, (float(lr_mults[best]) if best is not None else 1.0)


def param_groups(model: nn.Module, lr_mults: Mapping[str, float] | None = None) -> list[dict]:
    """Trainable parameters split by (lr_mult, weight decay or not).

    Norm-layer parameters and biases get no weight decay. ``lr_mults`` maps module-name
    prefixes to multipliers, e.g. ``{"roi_heads.mask_head": 4.0}``; a prefix that matches
    no parameter is an error (a typo would otherwise train that head at lr x 1).
    """
    lr_mults = dict(lr_mults or {})
    used: set[str] = set()
    seen: set[int] = set()
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            full = f"{module_name}.{param_name}" if module_name else param_name
            prefix, mult = _match_mult(full, lr_mults)
            if prefix is not None:
                used.add(prefix)
            no_decay = isinstance(module, NORM_TYPES) or param_name == "bias"
            groups.setdefault((mult, no_decay), []).append(param)
    unused = sorted(set(lr_mults) - used)
    if unused:
        raise ValueError(f"lr_mults prefixes match no trainable parameter: {unused}")
    out = []
    for (mult, no_decay), params in sorted(groups.items()):
        group = {"params": params, "lr_mult": mult}
        if no_decay:
            group["weight_decay"] = 0.0
        out.append(group)
    return out


def build_optimizer(model_or_param_groups: nn.Module | Iterable[dict],
                    solver: SolverConfig) -> torch.optim.SGD:
    """SGD with momentum and weight decay over :func:`param_groups` of a model or given groups.

    Given groups are dicts with ``params`` and optional ``lr_mult`` (default 1) and
    ``weight_decay`` (default ``solver.weight_decay``); each group's lr is ``solver.lr * lr_mult``.
    """
    check_solver(solver)
    if isinstance(model_or_param_groups, nn.Module):
        raw = param_groups(model_or_param_groups)
    else:
        raw = list(model_or_param_groups)
    groups = []
    for g in raw:
        if not isinstance(g, Mapping) or "params" not in g:
            raise TypeError("each param group must be a dict with a 'params' entry")
        group = dict(g)
        group["params"] = list(group["params"])
        if not group["params"]:
            continue
        group["lr_mult"] = float(group.get("lr_mult", 1.0))
        group["lr"] = solver.lr * group["lr_mult"]
        group.setdefault("weight_decay", solver.weight_decay)
        groups.append(group)
    if not groups:
        raise ValueError("no trainable parameters to optimise")
    return torch.optim.SGD(groups, lr=solver.lr, momentum=solver.momentum,
                           weight_decay=solver.weight_decay)


def build_lr_scheduler(optimizer: torch.optim.Optimizer,
                       solver: SolverConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR of :func:`lr_factor`; step it once per iteration, after ``optimizer.step()``."""
    check_solver(solver)

    def factor(iteration: int) -> float:  # a plain function: LambdaLR does not pickle it
        return lr_factor(iteration, solver)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
