"""The schemas of the training loop both halves share: the solver and the run."""

from __future__ import annotations

from dataclasses import dataclass, field

from predet.config.base import (
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    Check,
    above,
    between,
    checked,
    one_of,
)
from predet.config.choices import LR_SCHEDULES


@checked(lr=NON_NEGATIVE, momentum=between(0, 0.999), weight_decay=NON_NEGATIVE, max_iters=above(0),
         warmup_iters=NON_NEGATIVE, warmup_factor=between(0, 1), schedule=one_of(*LR_SCHEDULES),
         milestones=Check(lambda v: all(m >= 0 for m in v) and v == sorted(v), "iterations >= 0, ascending"),
         gamma=POSITIVE, clip_grad_norm=NON_NEGATIVE, amp=one_of("none", "bf16", "fp16"))
@dataclass
class SolverConfig:
    """Optimisation settings shared by pre-training and fine-tuning."""

    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    max_iters: int = 1000
    warmup_iters: int = 100
    warmup_factor: float = 0.001
    schedule: str = "step"  # "step" (lr x gamma at each milestone) or "cosine"
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    clip_grad_norm: float = 0.0  # 0 disables clipping
    amp: str = "none"  # "none", "bf16" (CUDA or CPU autocast) or "fp16" (with a GradScaler)


@checked(seed=NON_NEGATIVE, batch_size=above(0), num_workers=NON_NEGATIVE, checkpoint_period=NON_NEGATIVE,
         keep_checkpoints=NON_NEGATIVE, log_period=NON_NEGATIVE, eval_period=NON_NEGATIVE,
         max_skipped_fraction=FRACTION,
         device=Check(lambda v: v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()),
                      "auto, cpu, cuda or cuda:N"))
@dataclass
class TrainConfig:
    """Run-level settings of the shared training loop."""

    run_dir: str = "runs/default"
    seed: int = 0
    device: str = "auto"  # "auto", "cpu", "cuda"
    batch_size: int = 4  # images per process per iteration
    num_workers: int = 0
    checkpoint_period: int = 500
    # Newest periodic checkpoints kept (0: all); model_final.pth is never removed. Two or more
    # leave a fallback when the newest is damaged.
    keep_checkpoints: int = 3
    log_period: int = 20
    eval_period: int = 0  # 0 disables periodic evaluation
    resume: bool = False
    sync_bn: bool = False
    find_unused_parameters: bool = False
    progress: bool = True
    # Stop the run when more than this fraction of image reads fail (0.1: 10 %).
    max_skipped_fraction: float = 0.1


# Keys that say how a run is executed, not what it trains: they may change when a run is
# resumed, and runs that differ only in them are the same setting.
RUN_ONLY_KEYS = (
    "train.resume",
    "train.progress",
    "train.num_workers",
    "train.run_dir",
    "train.log_period",
    "train.checkpoint_period",
    "train.keep_checkpoints",
    "train.max_skipped_fraction",
    "eval.batch_size",
    "eval.num_workers",
    "eval.visualize",
)
# Sections that only watch a run (pre-training's transfer probe): every key under them is run-only.
RUN_ONLY_SECTIONS = ("probe",)


def run_only(key: str) -> bool:
    """Whether a dotted config key says how a run is executed or watched, not what it trains
    (matched as a dotted suffix, or as a key under a watching section)."""
    return (any(key == n or key.endswith("." + n) for n in RUN_ONLY_KEYS)
            or key.split(".", 1)[0] in RUN_ONLY_SECTIONS)
