"""Successive halving over a sweep's grid: every point at a short budget, the best fraction
continues at a longer one, the survivors of the last rung run the full schedule, and only the
winner gets all its seeds (Jamieson & Talwalkar 2016; Hyperband's inner loop).

Budgets are fractions of the config's named schedule: rung ``r`` of ``R`` runs
``eta ** (r - R + 1)`` of it by scaling ``schedule_scale``, so each rung's lr warm-up and decays
(2/3 and 8/9 of a 1x) fall inside its own budget and its final AP is a finished run's, not a
run cut before its decays. Each rung keeps ``max(1, n // eta)`` points by their mean val metric
(ties: grid order); the test split is never looked at, and a rung below the full budget does
not evaluate it at all. Every rung is an ordinary sweep folder named by its rung and budget
(``OUT/rung0_budget0.1111/``, one seed per point), so a killed search resumes where it was:
finished runs are read back, the survivors re-derived from them, and only what is missing runs;
a search with another ``eta`` or ``rungs`` gets other folders. With ``val_subset`` N the rungs
below the full budget are scored on a fixed random N-image subset of ``data.val`` (evaluating a
whole val split is a fixed cost per run that a short rung cannot amortise: on FashionDet it is
over half of a 1/9-budget run); the last rung and the winner use all of val. The winner's other seeds run in
the last rung's folder beside its seed 0 (``winner_summary.json`` there; ``summary.json`` keeps
the rung's comparison). The planned cost counts full runs of one schedule: a grid over
``schedule`` itself (``small_data``) costs more than it says.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable

from predet.checkpoint.atomic import atomic_write
from predet.config import ConfigError
from predet.config.finetune import load_finetune_config
from predet.data.coco_json import fixed_val_subset
from predet.errors import DataError
from predet.tools.sweep.grid import expand_grid, run_name
from predet.tools.sweep.launch import LAUNCHERS
from predet.tools.sweep.results import ranked_settings
from predet.tools.sweep.run import check_inputs, run_points


def rung_budgets(eta: int, rungs: int) -> list[float]:
    """Fractions of the full schedule, shortest first: ``eta=3, rungs=3`` -> 1/9, 1/3, 1."""
    if eta < 2 or rungs < 1:
        raise ConfigError(f"--eta {eta}, --rungs {rungs}: halving needs eta >= 2 and at least one rung")
    return [float(eta) ** (r - rungs + 1) for r in range(rungs)]


def rung_sizes(points: int, eta: int, rungs: int) -> list[int]:
    """How many points each rung runs: all, then ``n // eta`` of the previous (at least 1)."""
    sizes = [points]
    for _ in range(rungs - 1):
        sizes.append(max(1, sizes[-1] // eta))
    return sizes


def planned_cost(points: int, eta: int, rungs: int, seeds: int = 1) -> float:
    """The search's training in full-schedule runs: sum of points x budget over the rungs, plus
    the winner's extra seeds (an exhaustive grid at one seed costs ``points``)."""
    return sum(n * b for n, b in zip(rung_sizes(points, eta, rungs), rung_budgets(eta, rungs))) + seeds - 1


def best_points(summary: dict, metric: str, keep: int) -> list[dict]:
    """The ``keep`` settings with the highest mean val ``metric``; ties keep grid order."""
    return [entry["settings"] for entry in ranked_settings(summary["settings"], metric)[:keep]]


def rung_folder(out_dir: Path, rung: int, budget: float, val_subset: int = 0) -> Path:
    return out_dir / (f"rung{rung}_budget{budget:.4g}" + (f"_val{val_subset}" if val_subset else ""))


def rung_val(data, val_subset: int, out_dir: Path) -> tuple[str, int]:
    """The val file the short rungs are scored on and its size (0: all of ``data.val``): a fixed
    subset written under ``out_dir``, the same bytes on every resume."""
    if not val_subset:
        return data.val, 0
    if not data.val:
        raise ConfigError("--rung-val-subset needs a val split (data.val)")
    short = fixed_val_subset(data.val, val_subset, out_dir)
    return str(short), (val_subset if short != Path(data.val) else 0)


# keys a rung sets itself: a grid value for them would replace every rung's budget
RUNG_OWNED_KEYS = ("schedule_scale", "solver.max_iters", "solver.milestones")


def halving(config: str | Path | None, grid: dict, seeds: int = 3, metric: str = "bbox/AP",
            out_dir: str | Path = "runs/sweep", overrides: Iterable[str] = (), eta: int = 3, rungs: int = 3,
            launcher: str = "local", nproc: int = 1, echo: Callable[[str], None] | None = print,
            retry_failed: bool = False, val_subset: int = 0, **launcher_opts) -> dict:
    """Successive halving over ``grid``; returns (and writes to ``OUT/halving.json``) the rungs,
    their survivors, the winner with its seeds' summary, and the training time of every run."""
    if launcher not in LAUNCHERS:
        raise ConfigError(f"unknown launcher {launcher!r}; valid: {', '.join(LAUNCHERS)}")
    echo = echo or (lambda _text: None)
    overrides = list(overrides)
    grid = check_inputs(config, grid, overrides)
    if owned := [k for k in grid if k in RUNG_OWNED_KEYS]:
        raise ConfigError(f"--search halving sets {', '.join(owned)} for each rung's budget; take it out of the grid")
    base = load_finetune_config(config, overrides)
    if not base.schedule:
        raise ConfigError("--search halving needs a named schedule (schedule=1x, ...): each rung runs a fraction "
                          "of it with its decays inside; set schedule=NAME and schedule_scale instead of solver.max_iters")
    budgets = rung_budgets(eta, rungs)
    out_dir = Path(out_dir)
    from predet.engine.runfolder import (
        run_folder,  # (imports torch: not at module level)
    )

    with run_folder(out_dir, "halving search"):
        short_val, val_subset = rung_val(base.data, val_subset, out_dir)
        points, record = expand_grid(grid), {"grid": grid, "eta": eta, "budgets": budgets, "metric": metric,
                                             "val_subset": val_subset, "rungs": []}
        for r, budget in enumerate(budgets):
            last = r == len(budgets) - 1
            rung_overrides = overrides + [f"schedule_scale={base.schedule_scale * budget!r}"]
            if not last:
                rung_overrides.append("data.test=")  # a partial budget is never reported, so never tested
                if val_subset:
                    rung_overrides.append(f"data.val={short_val}")
            echo(f"== rung {r + 1}/{len(budgets)}: {len(points)} point(s) at {budget:.3g} of the schedule")
            folder = rung_folder(out_dir, r, budget, 0 if last else val_subset)
            summary = run_points(config, points, 1, metric, folder, rung_overrides, launcher, nproc,
                                 echo, retry_failed, launcher_opts, info={"rung": r, "budget": budget})
            keep = 1 if last else max(1, len(points) // eta)
            survivors = best_points(summary, metric, keep)
            record["rungs"].append({"rung": r, "budget": budget, "points": [run_name(p) for p in points],
                                    "kept": [run_name(p) for p in survivors], "seconds": _seconds(summary)})
            if not survivors:
                raise DataError(f"halving: no run of rung {r} has a val {metric}; see the runs' log.txt in {folder}")
            points = survivors
        winner = points[0]
        echo(f"== the winner, {run_name(winner)}: {seeds} seed(s) at the full schedule")
        final = run_points(config, [winner], seeds, metric, folder, rung_overrides, launcher, nproc, echo,
                           retry_failed, launcher_opts, info={"rung": "winner", "budget": 1.0},
                           summary_name="winner_summary")
        extra = [r for r in final["runs"] if r["seed"] > 0]
        record.update(winner=winner, winner_name=run_name(winner), best=final["best"],
                      extra_seed_seconds=sum(r.get("seconds") or 0 for r in extra),
                      seconds=sum(r["seconds"] for r in record["rungs"]) + sum(r.get("seconds") or 0 for r in extra),
                      planned_cost=planned_cost(len(expand_grid(grid)), eta, len(budgets), seeds))
        atomic_write(out_dir / "halving.json", lambda f: f.write(json.dumps(record, indent=1, default=str) + "\n"),
                     mode="w")
        best = final["best"]
        if best:
            spread = f" ± {100 * best['std']:.1f}" if best.get("std") is not None else ""
            echo(f"halving chose {record['winner_name']}: val {metric} {100 * best['mean']:.1f}{spread} over "
                 f"{best['val'][metric]['n']} seed(s); {record['seconds'] / 60:.0f} min of runs; {out_dir / 'halving.json'}")
        return record


def _seconds(summary: dict) -> float:
    """The wall seconds of a rung's runs (each run's process; a run resumed counts its last part)."""
    return sum(r.get("seconds") or 0 for r in summary["runs"])
