"""Named fine-tuning schedules of the PreDet supplement, scaled to any batch size.

The paper counts iterations at batch 16 (Detectron2 convention: 1x = 90k iterations with the
learning rate multiplied by gamma at 2/3 and 8/9 of the run). A run here may use another
batch size, or a CPU-sized fraction of the budget, so ``resolve_schedule`` rescales both the
length and the drop points while keeping the drops at the same fraction of the run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace

BASE_BATCH = 16
ONE_X_ITERS = 90_000
_SUPPLEMENT = "PreDet supplement §1"


@dataclass(frozen=True)
class Schedule:
    """A step schedule: ``max_iters`` iterations at ``base_batch`` images per iteration,
    learning rate multiplied by gamma at each of ``milestones``.

    ``documented`` is False when the paper names the length but not the drop points, so the
    drops here are our convention rather than the authors' choice.
    """

    name: str
    max_iters: int
    milestones: tuple[int, ...]
    base_batch: int = BASE_BATCH
    source: str = ""
    documented: bool = True

    def solver_overrides(self) -> dict:
        """Dotted config keys that make the solver run this schedule."""
        return {"solver.max_iters": self.max_iters, "solver.milestones": list(self.milestones)}


def _detectron2_milestones(max_iters: int) -> tuple[int, int]:
    """Drops at 2/3 and 8/9 of the run, as Detectron2's 1x (60k, 80k of 90k) does."""
    return (max_iters * 2 // 3, max_iters * 8 // 9)


def _multiple_of_1x(k: int) -> Schedule:
    iters = k * ONE_X_ITERS
    return Schedule(
        name=f"{k}x",
        max_iters=iters,
        milestones=_detectron2_milestones(iters),
        source=(
            f"{k}x = {k} x 90k iterations at batch 16, lr x gamma at 2/3 and 8/9 of the run "
            "(Detectron2 convention; docs/method.md §3, supplement Tables 3-4)"
        ),
    )


def _build_schedules() -> dict[str, Schedule]:
    schedules = {s.name: s for s in (_multiple_of_1x(k) for k in (1, 2, 3, 6, 9))}
    for name, iters, drops in (("60k", 60_000, (40_000, 55_000)),
                               ("70k", 70_000, (50_000, 65_000)),
                               ("130k", 130_000, (100_000, 120_000))):
        schedules[name] = Schedule(
            name, iters, drops,
            source=f"{_SUPPLEMENT} (smaller target datasets): for {name} iterations, "
                   f"dropped lr at ({drops[0] // 1000}k, {drops[1] // 1000}k)",
        )
    schedules["90k"] = replace(
        schedules["1x"], name="90k",
        source="Supplement Table 2 '90k' = the standard 1x schedule (90k iterations, drops at 60k, 80k)",
    )
    schedules["540k"] = replace(
        schedules["6x"], name="540k",
        source="Supplement Table 2 '540k' = 6x (540k iterations, drops at 360k, 480k)",
    )
    schedules["80k"] = Schedule(
        "80k", 80_000, _detectron2_milestones(80_000),
        source="Supplement Table 2 '80k': the supplement gives no drop points for it; "
               "UNDOCUMENTED drops at 2/3 and 8/9 of the run (Detectron2 convention) assumed here",
        documented=False,
    )
    return schedules


SCHEDULES: dict[str, Schedule] = _build_schedules()
SCHEDULE_NAMES: tuple[str, ...] = tuple(SCHEDULES)


def normalize_schedule_name(name: str) -> str:
    """Accept '1×', '1X', ' 2x ' and the like for the canonical '1x'."""
    return str(name).strip().lower().replace("×", "x")


def get_schedule(name: str) -> Schedule:
    """The schedule as the paper states it (batch 16, full length)."""
    key = normalize_schedule_name(name)
    if key not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; valid names: {', '.join(SCHEDULE_NAMES)}")
    return SCHEDULES[key]


def _round_half_up(x: float) -> int:
    return int(x + 0.5)


def scale_milestones(milestones: tuple[int, ...], factor: float, max_iters: int) -> tuple[int, ...]:
    """Scale drop points by ``factor``, keeping them strictly increasing, ≥ 1 and < max_iters.

    Rounding can merge neighbouring drops in very short runs: later ones are pushed one
    iteration on, and any that no longer fit before the end are dropped.
    """
    out: list[int] = []
    for m in milestones:
        value = max(1, _round_half_up(m * factor))
        if out:
            value = max(value, out[-1] + 1)
        if value >= max_iters:
            break
        out.append(value)
    return tuple(out)


def scale_solver(solver, reference_batch: int, batch: int):
    """``solver`` given at ``reference_batch`` images per step, run at ``batch``: the linear
    scaling rule (Goyal et al. 2017), lr x k and iterations, warm-up and milestones / k with
    k = batch / reference_batch, so the run sees the same images on the same lr curve."""
    if reference_batch <= 0 or batch == reference_batch:
        return solver
    factor = reference_batch / batch
    max_iters = max(1, _round_half_up(solver.max_iters * factor))
    warmup = _round_half_up(solver.warmup_iters * factor) if solver.warmup_iters else 0
    return dataclasses.replace(
        solver, lr=solver.lr / factor, max_iters=max_iters, warmup_iters=min(warmup, max_iters - 1),
        milestones=list(scale_milestones(tuple(solver.milestones), factor, max_iters)))


def resolve_schedule(name: str, batch_size: int = BASE_BATCH, schedule_scale: float = 1.0) -> Schedule:
    """The named schedule for ``batch_size`` images per iteration, shortened by ``schedule_scale``.

    Iterations scale as ``iters * 16 / batch_size * schedule_scale`` so the number of images
    seen stays the paper's (times ``schedule_scale``, e.g. 0.01 for a CPU smoke run).
    The returned ``base_batch`` is ``batch_size``: the batch its iterations are counted at.
    """
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not schedule_scale > 0:
        raise ValueError(f"schedule_scale must be > 0, got {schedule_scale!r}")
    base = get_schedule(name)
    factor = base.base_batch / batch_size * schedule_scale
    if factor == 1.0:
        return base
    max_iters = max(1, _round_half_up(base.max_iters * factor))
    note = f"; scaled to batch {batch_size}" + (f" x {schedule_scale:g}" if schedule_scale != 1.0 else "")
    return replace(
        base,
        max_iters=max_iters,
        milestones=scale_milestones(base.milestones, factor, max_iters),
        base_batch=int(batch_size),
        source=base.source + note,
    )


def scale_lr(lr: float, batch_size: int, base_batch: int = BASE_BATCH) -> float:
    """Linear scaling rule: the paper's lr is for batch 16; a batch of 8 gets half of it."""
    if batch_size < 1 or base_batch < 1:
        raise ValueError("batch sizes must be positive")
    return lr * batch_size / base_batch
