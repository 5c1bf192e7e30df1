"""``predet sweep``: every grid point x seed, as the supplement searches (``sweep``), and the
runner a halving rung uses too (``run_points``; ``check_inputs`` refuses what would fail every run).

Every grid point and seed is one ``predet finetune`` run in its own directory,
``OUT/<run name>/seed<k>``, launched as a separate process so that a crash or an OOM in one
run cannot take the sweep down. The sweep is resumable: a run with ``results.json`` is
finished and skipped, a run with a checkpoint but no results continues from it
(``train.resume=true``), a failed run is recorded. A run that failed on its own inputs (exit 2:
a user error, the same every time) is not retried unless asked (``retry_failed``); one that
was killed or crashed is retried on the next call. A sweep folder is held by one live sweep
(``.lock``), and a run's process dies with the sweep that launched it. The best
setting is chosen on the validation split only (mean over seeds); test numbers are reported,
never used to choose.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable

from predet.checkpoint.atomic import atomic_write
from predet.config import ConfigError, parse_override
from predet.engine.runfolder import run_folder
from predet.tools.sweep.grid import (
    SHORT_KEYS,
    SWEEP_OWNED_KEYS,
    expand_grid,
    normalize_grid,
    plan_points,
    run_overrides,
)
from predet.tools.sweep.launch import LAUNCHERS, launch_all
from predet.tools.sweep.results import (
    checkpoint_iteration,
    metric_value,
    read_results,
    write_summary,
)

FAILED_FILE = "failed.json"  # in a run folder: the run failed deterministically (exit 2)
TIME_FILE = "sweep_time.json"  # in a run folder: the wall seconds of the launch that finished it
USER_ERROR_EXIT = 2


def _finish_row(row: dict, outcome: dict) -> dict:
    """Fill a run's row from its launcher outcome and its results.json."""
    results = read_results(Path(row["run_dir"]))
    row["returncode"], row["seconds"] = outcome.get("returncode"), outcome.get("seconds")
    if outcome.get("returncode") == 0 and results is not None:
        row.update(status="done", error="", val=results.get("val", {}), test=results.get("test", {}))
        if row["seconds"] is not None:  # what a later call (a resumed search) reports for it
            record = json.dumps({"seconds": row["seconds"], "resumed_from": row.get("resumed_from")}) + "\n"
            atomic_write(Path(row["run_dir"]) / TIME_FILE, lambda f: f.write(record), mode="w")
    else:
        error = outcome.get("error") or "the run exited without writing results.json"
        row.update(status="failed", error=error)
        if outcome.get("returncode") == USER_ERROR_EXIT:
            record = json.dumps({"returncode": USER_ERROR_EXIT, "error": error}) + "\n"
            atomic_write(Path(row["run_dir"]) / FAILED_FILE, lambda f: f.write(record), mode="w")
    return row


def _progress_line(i: int, total: int, row: dict, metric: str) -> str:
    head = f"[{i}/{total}] {row['name']} seed{row['seed']}: "
    value = metric_value(row, "val", metric)
    score = f" {metric} {100 * value:.1f}" if value is not None else f" (no val {metric})"
    if row["status"] == "done" and row.get("skipped"):
        drift = row.get("drift") or []
        note = (f" — WARNING: its saved config differs from this sweep's ({'; '.join(drift[:3])}"
                f"{'; ...' if len(drift) > 3 else ''}); delete the folder to redo it") if drift else ""
        return head + "finished earlier, skipped" + score + note
    if row["status"] == "failed" and row.get("skipped"):
        last = (row.get("error") or "").strip().splitlines()
        return (head + f"failed earlier (exit {row.get('returncode')}), not retried"
                + (f": {last[-1]}" if last else "") + " — fix it, then run again with --retry-failed")
    if row["status"] == "done":
        resumed = f" (resumed from iteration {row['resumed_from']})" if row.get("resumed_from") is not None else ""
        return head + "done" + resumed + score + f" ({row['seconds']:.0f} s)"
    last = (row.get("error") or "").strip().splitlines()
    code = row.get("returncode")
    return head + f"FAILED (exit {code})" + (f": {last[-1]}" if last else "") + f" — see {row['run_dir']}/log.txt"


# --------------------------------------------------------------------------- sweep


def check_inputs(config, grid: dict, overrides: list[str]) -> dict:
    """Fail before any run starts on what would fail every run: bad keys, a broken base config."""
    from predet.config import valid_keys
    from predet.config.finetune import FinetuneConfig, load_finetune_config

    grid = normalize_grid(grid)
    for text in overrides:
        if ".".join(parse_override(text)[0]) in SWEEP_OWNED_KEYS:
            raise ConfigError(f"override {text!r}: the sweep sets {', '.join(SWEEP_OWNED_KEYS)} itself")
    keys = set(valid_keys(FinetuneConfig))
    for key in grid:
        if key not in keys:
            raise ConfigError(f"unknown grid key {key!r}; short names: {', '.join(SHORT_KEYS)}; "
                              f"config keys: {', '.join(sorted(keys))}")
    load_finetune_config(config, overrides)
    return grid


def config_drift(run: dict, config, overrides: list[str]) -> list[str]:
    """How a finished run's saved config differs from what this sweep would run now.

    A finished run is never redone, so a changed override (a longer schedule, other data)
    would silently mix old results in; the progress line says so instead.
    """
    import yaml

    from predet.config import to_dict
    from predet.config.finetune import load_finetune_config
    from predet.engine.resume import config_differences

    saved = Path(run["run_dir"]) / "config.yaml"
    if not saved.is_file():
        return []
    try:
        now = to_dict(load_finetune_config(config, run_overrides(run, overrides, resume=False)))
        return config_differences(yaml.safe_load(saved.read_text()) or {}, now)
    except (ConfigError, ValueError, OSError):
        return []


def _recorded_seconds(run_dir: Path) -> float | None:
    try:
        return float(json.loads((run_dir / TIME_FILE).read_text())["seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _initial_row(run: dict, config, overrides: list[str], retry_failed: bool = False) -> dict:
    """A planned run as found on disk: finished (skipped), failed on its inputs (skipped
    unless ``retry_failed``), interrupted (to resume) or new."""
    row = {**run, "status": "pending", "skipped": False, "resumed_from": None, "seconds": None,
           "returncode": None, "error": "", "val": {}, "test": {}, "drift": []}
    results = read_results(Path(run["run_dir"]))
    failed = Path(run["run_dir"]) / FAILED_FILE
    if results is None and failed.is_file() and retry_failed:
        failed.unlink()
    if results is not None:
        row.update(status="done", skipped=True, val=results.get("val", {}), test=results.get("test", {}),
                   drift=config_drift(run, config, overrides), seconds=_recorded_seconds(Path(run["run_dir"])))
    elif failed.is_file():
        try:
            record = json.loads(failed.read_text())
        except ValueError:
            record = {}
        row.update(status="failed", skipped=True, returncode=record.get("returncode", USER_ERROR_EXIT),
                   error=str(record.get("error", "")))
    else:
        row["resumed_from"] = checkpoint_iteration(Path(run["run_dir"]))
    return row


def _closing_lines(summary: dict, metric: str, name: str = "summary") -> list[str]:
    best, rows = summary["best"], summary["runs"]
    lines = []
    if best:
        spread = f" ± {100 * best['std']:.1f}" if best["std"] is not None else ""
        lines.append(f"best on val ({metric}, mean over {best['val'][metric]['n']} seed(s)): {best['name']} "
                     f"{100 * best['mean']:.1f}{spread}")
    failed = sum(r["status"] == "failed" for r in rows)
    deterministic = sum(r["status"] == "failed" and r.get("returncode") == USER_ERROR_EXIT for r in rows)
    if failed > deterministic:
        lines.append(f"{failed - deterministic} of {len(rows)} run(s) crashed or were killed; run the "
                     "same command again to retry them")
    if deterministic:
        lines.append(f"{deterministic} of {len(rows)} run(s) failed on their inputs (exit 2, see each "
                     "log.txt); they are not retried: fix them, then add --retry-failed")
    out = Path(summary["out_dir"])
    lines.append(f"summary: {out / f'{name}.json'}, {out / f'{name}.csv'}")
    return lines


def sweep(config: str | Path | None, grid: dict, seeds: int = 3, metric: str = "bbox/AP",
          out_dir: str | Path = "runs/sweep", overrides: Iterable[str] = (), launcher: str = "local",
          nproc: int = 1, echo: Callable[[str], None] | None = print, retry_failed: bool = False,
          **launcher_opts) -> dict:
    """Fine-tune and evaluate every grid point × seed; returns (and writes) the summary.

    ``launcher``: ``local`` (one process per run; ``jobs`` runs side by side, each limited to
    ``threads`` CPU threads, by default the cores shared out between them), ``torchrun``
    (``nproc`` processes per run) or ``submitit`` (every pending run a SLURM job; options
    ``slurm_partition``, ``slurm_time`` in minutes, ``gpus_per_node``). Runs already finished
    are skipped; interrupted ones resume from their checkpoint; failures are recorded in the
    summary (rewritten after every run) and do not stop the other runs; a run that failed
    on its inputs (exit 2) is not relaunched by a later call unless ``retry_failed``.
    """
    if launcher not in LAUNCHERS:
        raise ConfigError(f"unknown launcher {launcher!r}; valid: {', '.join(LAUNCHERS)}")
    echo = echo or (lambda _text: None)
    overrides = list(overrides)
    grid = check_inputs(config, grid, overrides)
    out_dir = Path(out_dir)
    with run_folder(out_dir, "sweep"):
        return run_points(config, expand_grid(grid), seeds, metric, out_dir, overrides, launcher, nproc, echo,
                          retry_failed, launcher_opts, info={"grid": grid})


def run_points(config, points: list[dict], seeds: int, metric: str, out_dir: Path, overrides: list[str],
               launcher: str, nproc: int, echo, retry_failed: bool, launcher_opts: dict, info: dict,
               summary_name: str = "summary") -> dict:
    """Every setting of ``points`` x ``seeds`` in ``out_dir`` (the caller holds its lock): what
    a sweep runs for its grid, and a halving search for each rung. The summary goes to
    ``out_dir/<summary_name>.json`` and ``.csv``."""
    info = {"config": str(config) if config else None, "overrides": overrides, **info,
            "seeds": int(seeds), "launcher": launcher, "out_dir": str(out_dir)}
    rows = [_initial_row(run, config, overrides, retry_failed) for run in plan_points(points, seeds, out_dir)]
    position = {id(r): i + 1 for i, r in enumerate(rows)}
    write_summary(out_dir, info, rows, metric, summary_name)
    for row in rows:
        if row["skipped"]:
            echo(_progress_line(position[id(row)], len(rows), row, metric))

    pending = [r for r in rows if not r["skipped"]]
    outcomes = launch_all(pending, config, overrides, launcher, nproc, out_dir, echo, launcher_opts)
    try:
        for row, outcome in zip(pending, outcomes):
            _finish_row(row, outcome)
            echo(_progress_line(position[id(row)], len(rows), row, metric))
            write_summary(out_dir, info, rows, metric, summary_name)
    finally:  # stopped early (Ctrl-C, an error): launch nothing more
        getattr(outcomes, "close", lambda: None)()

    summary = write_summary(out_dir, info, rows, metric, summary_name)
    for line in _closing_lines(summary, metric, summary_name):
        echo(line)
    return summary
