"""``predet sweep``: grid search of fine-tuning settings × seeds, as the supplement does it.

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

Grid values use the ``key=value`` grammar of the command line (``predet.config``), with short
names for the searched keys (``lr``, ``gamma``, ``lr_mf``, ``schedule``, ``init``, ``wd``).
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable

from predet.config import SCRATCH_INITS, ConfigError, parse_override

SHORT_KEYS: dict[str, str] = {
    "lr": "solver.lr",
    "gamma": "solver.gamma",
    "lr_mf": "optim.lr_mf",
    "schedule": "schedule",
    "init": "init",
    "wd": "solver.weight_decay",
}
_SHORT_NAMES = {v: k for k, v in SHORT_KEYS.items()}
# The sweep decides these per run; a grid or override that sets them would break the layout.
SWEEP_OWNED_KEYS = ("train.run_dir", "train.seed", "train.resume")
LAUNCHERS = ("local", "torchrun", "submitit")
ERROR_TAIL_LINES = 20
FAILED_FILE = "failed.json"  # in a run folder: the run failed deterministically (exit 2)
USER_ERROR_EXIT = 2


# --------------------------------------------------------------------------- grid


def dotted_key(name: str) -> str:
    """A short grid name (``lr``) to its config key (``solver.lr``); dotted keys pass through."""
    return SHORT_KEYS.get(name.strip(), name.strip())


def _split_values(text: str) -> list[str]:
    """``0.01,0.02`` -> two values; commas inside ``[...]`` stay (``[8,16],[16,32]``)."""
    out, depth, current = [], 0, ""
    for ch in text:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            out.append(current)
            current = ""
        else:
            current += ch
    out.append(current)
    return [v.strip() for v in out if v.strip()]


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def parse_value(key: str, text: str) -> Any:
    """YAML-parse one grid value as an override would be; ``5e-5`` counts as a number."""
    _, value = parse_override(f"{key}={text}")
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        return float(value)
    return value


def parse_grid_args(args: Iterable[str]) -> dict[str, list]:
    """``["table1", "lr=0.01,0.02", "init=a.pth,scratch"]`` -> {dotted key: values}.

    A bare word names a grid of the supplement (``predet.config.presets.GRIDS``); a later
    ``key=...`` replaces that key's values, so ``table1 lr=0.01`` narrows a named grid.
    """
    from predet.config.presets import GRIDS

    grid: dict[str, list] = {}
    for arg in args:
        arg = arg.strip()
        if "=" not in arg:
            if arg not in GRIDS:
                raise ConfigError(f"unknown grid {arg!r}: give key=v1,v2 or a named grid ({', '.join(GRIDS)})")
            for key, values in GRIDS[arg].items():
                grid[key] = list(values)
            continue
        name, raw = arg.split("=", 1)
        key = dotted_key(name)
        if not key:
            raise ConfigError(f"grid entry {arg!r} has an empty key")
        values = [parse_value(key, v) for v in _split_values(raw)]
        if not values:
            raise ConfigError(f"grid entry {arg!r} has no values")
        grid[key] = values
    return grid


def normalize_grid(grid: dict[str, Iterable]) -> dict[str, list]:
    """Short names to dotted keys, values to lists; rejects keys the sweep sets itself."""
    out: dict[str, list] = {}
    for name, values in grid.items():
        key = dotted_key(name)
        if key in SWEEP_OWNED_KEYS:
            raise ConfigError(f"{key} is set by the sweep for every run; use --seeds for seeds and --out for the folder")
        values = list(values) if isinstance(values, (list, tuple)) else [values]
        if not values:
            raise ConfigError(f"grid key {key} has no values")
        out[key] = values
    return out


def expand_grid(grid: dict[str, list]) -> list[dict]:
    """The cartesian product, first key varying slowest; an empty grid is one run of the config."""
    grid = normalize_grid(grid)
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


# --------------------------------------------------------------------------- names


def pretraining_label(init: Any) -> str:
    """A short name for a pre-training: its run's folder (the parent of ``checkpoints/``).

    ``runs/pretrain/predet_r18/checkpoints/model_final.pth`` -> ``predet_r18``; an
    intermediate ``checkpoint_0001000.pth`` adds ``-it1000``; a file elsewhere (an external
    SEER or torchvision file) is named by its stem; ``scratch``/``random`` -> ``scratch``.
    """
    text = str(init).strip()
    if not text or text in SCRATCH_INITS:
        return "scratch"
    path = Path(text)
    stem = path.name.split(".")[0] or path.name
    if path.parent.name != "checkpoints" or not path.parent.parent.name:
        return stem
    label = path.parent.parent.name
    step = re.fullmatch(r"checkpoint_(\d+)", stem)
    if step:
        label += f"-it{int(step.group(1))}"
    elif not stem.startswith("model_final"):
        label += f"-{stem}"
    return label


def _format_number(value: float | int) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _clean(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-") or "none"


def _name_part(key: str, value: Any) -> str:
    name = _SHORT_NAMES.get(key, key.rsplit(".", 1)[-1])
    if key == "init":
        return f"{name}-{_clean(pretraining_label(value))}"
    if isinstance(value, bool):
        return f"{name}-{str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"{name}{_format_number(value)}"
    if isinstance(value, (list, tuple)):
        return f"{name}-" + "-".join(_clean(_format_number(v) if isinstance(v, (int, float)) else str(v))
                                     for v in value)
    return f"{name}-{_clean(str(value))}"


def run_name(settings: dict) -> str:
    """``{"solver.lr": 0.01, "optim.lr_mf": 4.0}`` -> ``lr0.01_lr_mf4``.

    Numbers follow their short name directly (``lr0.01``), other values after a dash
    (``schedule-1x``, ``init-predet_r18``: the pre-training's name, not its path), so a
    folder listing reads as the grid. No settings (an empty grid) -> ``base``.
    """
    if not settings:
        return "base"
    return "_".join(_name_part(dotted_key(k), v) for k, v in settings.items())


def override_text(key: str, value: Any) -> str:
    """One ``key=value`` override that parses back to ``value``."""
    if isinstance(value, bool):
        return f"{key}={str(value).lower()}"
    if isinstance(value, str):
        return f"{key}={value}"
    return f"{key}={json.dumps(value)}"


# --------------------------------------------------------------------------- plan


def plan_runs(grid: dict, seeds: int, out_dir: str | Path) -> list[dict]:
    """One entry per (grid point, seed), grid point by grid point; names must be unique."""
    if int(seeds) < 1:
        raise ConfigError(f"--seeds must be at least 1, got {seeds}")
    runs, owner = [], {}
    for settings in expand_grid(grid):
        name = run_name(settings)
        if name in owner:
            raise ConfigError(f"grid points {owner[name]} and {settings} both get the run name {name!r}; "
                              "rename one (e.g. give each pre-training run its own folder name)")
        owner[name] = settings
        for seed in range(int(seeds)):
            runs.append({"name": name, "settings": settings, "seed": seed,
                         "run_dir": str(Path(out_dir) / name / f"seed{seed}")})
    return runs


def run_overrides(run: dict, overrides: Iterable[str], resume: bool) -> list[str]:
    """The user's overrides, then the grid point's, then the run's folder and seed."""
    items = list(overrides) + [override_text(k, v) for k, v in run["settings"].items()]
    items += [f"train.run_dir={run['run_dir']}", f"train.seed={run['seed']}"]
    if resume:
        items.append("train.resume=true")
    return items


def finetune_command(config: str | Path | None, overrides: list[str], launcher: str = "local",
                     nproc: int = 1) -> list[str]:
    """The argv of one run: ``python -m predet finetune`` or the same under torchrun.

    torchrun is invoked as ``python -m torch.distributed.run`` (what the ``torchrun`` script
    runs) so the sweep's own interpreter and environment are used; ``--standalone`` picks a
    free rendezvous port, so runs one after another never collide.
    """
    args = ["finetune"] + (["--config", str(config)] if config else []) + list(overrides)
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", str(int(nproc)), "-m", "predet", *args]
    return [sys.executable, "-m", "predet", *args]


def _checkpoint_iteration(run_dir: Path) -> int | None:
    """The iteration of the run's latest checkpoint, None when there is none."""
    from predet.checkpoint.io import latest_checkpoint

    path = latest_checkpoint(run_dir)
    if path is None:
        return None
    step = re.search(r"(\d+)", path.stem)
    return int(step.group(1)) if step else 0


def _read_results(run_dir: Path) -> dict | None:
    try:
        return json.loads((Path(run_dir) / "results.json").read_text())
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- launchers


def _tail(text: str, lines: int = ERROR_TAIL_LINES) -> str:
    """The last lines of a log, each reduced to what a progress bar left visible (after \\r)."""
    kept = [line.rsplit("\r", 1)[-1] for line in text.split("\n")]
    return "\n".join([line for line in kept if line.strip()][-lines:])


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the sweep dies, even by SIGKILL (Linux)."""
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def run_command(cmd: list[str], log_path: str | Path, env: dict | None = None) -> dict:
    """Run one process with stdout+stderr appended to ``log_path``; never raises for its failure.

    Returns ``{"returncode", "seconds", "error"}`` where ``error`` is the tail of this
    attempt's log when the process failed. Module-level so submitit can pickle it into a job.
    """
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(log_path, "ab") as log:
        offset = log.tell()
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
        log.flush()
        try:
            code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                   preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        except OSError as exc:  # the executable itself is missing
            log.write(f"{exc}\n".encode())
            code = 127
    seconds = time.time() - start
    error = ""
    if code != 0:
        with open(log_path, "rb") as log:
            log.seek(offset)
            error = _tail(log.read().decode(errors="replace"))
    return {"returncode": code, "seconds": seconds, "error": error}


def thread_env(threads: int) -> dict | None:
    """The environment of a child limited to ``threads`` CPU threads (0: inherit everything).

    Several small runs side by side, one thread each, get more work out of a few CPU cores
    than one run after another using them all: a CPU detector step does not scale linearly.
    """
    if not threads:
        return None
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = str(int(threads))
    return env


def launch_local(config, overrides: list[str], run_dir: str | Path, threads: int = 0) -> dict:
    """One run on this machine, one process: ``python -m predet finetune ...``."""
    return run_command(finetune_command(config, overrides, "local"), Path(run_dir) / "log.txt", thread_env(threads))


def launch_torchrun(config, overrides: list[str], run_dir: str | Path, nproc: int = 1) -> dict:
    """One run on this machine, ``nproc`` processes (one per GPU) under torchrun."""
    return run_command(finetune_command(config, overrides, "torchrun", nproc), Path(run_dir) / "log.txt")


def submit_submitit(cmds: list[list[str]], run_dirs: list[Path], folder: str | Path,
                    slurm_partition: str = "", slurm_time: int = 1440, gpus_per_node: int = 1) -> list:
    """Submit each command as a one-node SLURM job through submitit; returns the jobs.

    Each job runs ``run_command`` on its node (same log.txt as a local run), so the sweep's
    interpreter must be reachable from the nodes (a shared file system), as usual with submitit.
    """
    try:
        import submitit
    except ImportError:
        raise ConfigError("--launcher submitit needs the submitit package: pip install submitit") from None
    executor = submitit.AutoExecutor(folder=str(folder))
    params = {"timeout_min": int(slurm_time), "gpus_per_node": int(gpus_per_node), "nodes": 1,
              "tasks_per_node": 1, "name": "predet-sweep"}
    if slurm_partition:
        params["slurm_partition"] = slurm_partition
    executor.update_parameters(**params)
    return [executor.submit(run_command, cmd, Path(d) / "log.txt") for cmd, d in zip(cmds, run_dirs)]


def wait_submitit(job) -> dict:
    """Block until ``job`` ends; a job SLURM killed (time limit, node failure) is a failed run."""
    try:
        return job.result()
    except Exception as exc:  # submitit raises its own error types for jobs that did not finish
        return {"returncode": None, "seconds": None, "error": _tail(f"{type(exc).__name__}: {exc}")}


# --------------------------------------------------------------------------- results


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample std (ddof=1); the std of a single value is None, not 0."""
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def seed_gap(a: dict | None, b: dict | None) -> dict | None:
    """Whether ``a`` beats ``b`` beyond seed noise, our rule everywhere (the ladder, the demo):
    its mean is above by more than twice the larger sample std. ``a``/``b``: {"mean", "std"}."""
    if not a or not b or a.get("std") is None or b.get("std") is None:
        return None
    two_std = 2 * max(a["std"], b["std"])
    gap = a["mean"] - b["mean"]
    return {"gap": gap, "two_std": two_std, "wins_by_2std": gap > two_std}


def _metric(row: dict, split: str, metric: str) -> float | None:
    value = (row.get(split) or {}).get(metric)
    return float(value) if isinstance(value, (int, float)) and value >= 0 else None


def aggregate_settings(rows: list[dict]) -> list[dict]:
    """Per grid point: mean/std over its finished seeds of every val and test metric."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["name"], []).append(row)
    out = []
    for name, group in groups.items():
        done = [r for r in group if r.get("status") == "done"]
        entry = {"name": name, "settings": group[0]["settings"], "runs": len(group), "done": len(done)}
        for split in ("val", "test"):
            keys = sorted({k for r in done for k in (r.get(split) or {}) if "/" in k})
            stats = {}
            for key in keys:
                values = [v for v in (_metric(r, split, key) for r in done) if v is not None]
                if values:
                    mean, std = mean_std(values)
                    stats[key] = {"mean": mean, "std": std, "n": len(values)}
            entry[split] = stats
        out.append(entry)
    return out


def select_best(rows: list[dict], metric: str = "bbox/AP") -> dict:
    """The grid point with the highest validation ``metric`` (mean over its finished seeds).

    Only ``val`` is looked at: the test split is for reporting. Ties keep the earlier grid
    point. Returns that point's aggregate (see ``aggregate_settings``) plus ``metric``, ``mean``
    and ``std``; ``{}`` when no run has the metric.
    """
    best: dict = {}
    for entry in aggregate_settings(rows):
        stats = entry["val"].get(metric)
        if stats and (not best or stats["mean"] > best["mean"]):
            best = {**entry, "metric": metric, "mean": stats["mean"], "std": stats["std"]}
    return best


def write_summary(out_dir: Path, info: dict, rows: list[dict], metric: str) -> dict:
    """``summary.json`` (runs, per-setting mean/std, best) and ``summary.csv`` (one row a run)."""
    summary = {**info, "metric": metric, "selection_split": "val", "runs": rows,
               "settings": aggregate_settings(rows), "best": select_best(rows, metric)}
    out_dir.mkdir(parents=True, exist_ok=True)
    _atomic_text(out_dir / "summary.json", json.dumps(summary, indent=1, default=str) + "\n")
    setting_keys = list(dict.fromkeys(k for r in rows for k in r["settings"]))
    metric_keys = {s: sorted({k for r in rows for k in (r.get(s) or {}) if "/" in k}) for s in ("val", "test")}
    header = (["name", "seed", "status", *setting_keys]
              + [f"{s}/{k}" for s in ("val", "test") for k in metric_keys[s]]
              + ["seconds", "run_dir", "error"])
    lines = [header]
    for r in rows:
        error = (r.get("error") or "").strip().splitlines()
        lines.append([r["name"], r["seed"], r["status"], *(r["settings"].get(k, "") for k in setting_keys)]
                     + [(r.get(s) or {}).get(k, "") for s in ("val", "test") for k in metric_keys[s]]
                     + [f"{r['seconds']:.0f}" if r.get("seconds") is not None else "", r["run_dir"],
                        error[-1] if error else ""])
    tmp = out_dir / ".summary.csv.tmp"
    with open(tmp, "w", newline="") as f:
        csv.writer(f).writerows(lines)
    os.replace(tmp, out_dir / "summary.csv")
    return summary


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _finish_row(row: dict, outcome: dict) -> dict:
    """Fill a run's row from its launcher outcome and its results.json."""
    results = _read_results(Path(row["run_dir"]))
    row["returncode"], row["seconds"] = outcome.get("returncode"), outcome.get("seconds")
    if outcome.get("returncode") == 0 and results is not None:
        row.update(status="done", error="", val=results.get("val", {}), test=results.get("test", {}))
    else:
        error = outcome.get("error") or "the run exited without writing results.json"
        row.update(status="failed", error=error)
        if outcome.get("returncode") == USER_ERROR_EXIT:
            _atomic_text(Path(row["run_dir"]) / FAILED_FILE,
                         json.dumps({"returncode": USER_ERROR_EXIT, "error": error}) + "\n")
    return row


def _progress_line(i: int, total: int, row: dict, metric: str) -> str:
    head = f"[{i}/{total}] {row['name']} seed{row['seed']}: "
    value = _metric(row, "val", metric)
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
    from predet.finetune import FinetuneConfig, load_finetune_config

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
    from predet.engine.resume import config_differences
    from predet.finetune import load_finetune_config

    saved = Path(run["run_dir"]) / "config.yaml"
    if not saved.is_file():
        return []
    try:
        now = to_dict(load_finetune_config(config, run_overrides(run, overrides, resume=False)))
        return config_differences(yaml.safe_load(saved.read_text()) or {}, now)
    except (ConfigError, ValueError, OSError):
        return []


def _initial_row(run: dict, config, overrides: list[str], retry_failed: bool = False) -> dict:
    """A planned run as found on disk: finished (skipped), failed on its inputs (skipped
    unless ``retry_failed``), interrupted (to resume) or new."""
    row = {**run, "status": "pending", "skipped": False, "resumed_from": None, "seconds": None,
           "returncode": None, "error": "", "val": {}, "test": {}, "drift": []}
    results = _read_results(Path(run["run_dir"]))
    failed = Path(run["run_dir"]) / FAILED_FILE
    if results is None and failed.is_file() and retry_failed:
        failed.unlink()
    if results is not None:
        row.update(status="done", skipped=True, val=results.get("val", {}), test=results.get("test", {}),
                   drift=config_drift(run, config, overrides))
    elif failed.is_file():
        try:
            record = json.loads(failed.read_text())
        except ValueError:
            record = {}
        row.update(status="failed", skipped=True, returncode=record.get("returncode", USER_ERROR_EXIT),
                   error=str(record.get("error", "")))
    else:
        row["resumed_from"] = _checkpoint_iteration(Path(run["run_dir"]))
    return row


def _launch_all(pending: list[dict], config, overrides: list[str], launcher: str, nproc: int,
                out_dir: Path, echo, opts: dict):
    """The launcher outcomes of ``pending``, in order, each as soon as it is known."""
    def args(row):
        return run_overrides(row, overrides, resume=row["resumed_from"] is not None)

    if launcher == "local":
        jobs, threads = int(opts.get("jobs", 1)), int(opts.get("threads", 0))
        if jobs > 1:
            threads = threads or max(1, (os.cpu_count() or jobs) // jobs)
            pool = ThreadPoolExecutor(max_workers=jobs)
            outcomes = pool.map(lambda r: launch_local(config, args(r), r["run_dir"], threads), pending)
            pool.shutdown(wait=False)  # map() already queued every run; results arrive in order
            return outcomes
        return (launch_local(config, args(r), r["run_dir"], threads) for r in pending)
    if launcher == "torchrun":
        return (launch_torchrun(config, args(r), r["run_dir"], nproc) for r in pending)
    gpus = int(opts.get("gpus_per_node", 1))
    procs = max(int(nproc), gpus)  # one process per GPU of the job's node
    cmds = [finetune_command(config, args(r), "torchrun" if procs > 1 else "local", procs) for r in pending]
    jobs = submit_submitit(cmds, [Path(r["run_dir"]) for r in pending], opts.get("folder") or out_dir / ".submitit",
                           opts.get("slurm_partition", ""), opts.get("slurm_time", 1440), gpus)
    for row, job in zip(pending, jobs):
        row.update(status="submitted", job_id=str(getattr(job, "job_id", "")))
    if jobs:
        echo(f"submitted {len(jobs)} SLURM job(s): {', '.join(r['job_id'] for r in pending)}; waiting")
    return (wait_submitit(job) for job in jobs)


def _closing_lines(summary: dict, metric: str) -> list[str]:
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
    lines.append(f"summary: {out / 'summary.json'}, {out / 'summary.csv'}")
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
    from predet.engine.runfolder import (
        run_folder,  # (imports torch: not at module level)
    )

    with run_folder(out_dir, "sweep"):
        return _sweep(config, grid, seeds, metric, out_dir, overrides, launcher, nproc, echo,
                      retry_failed, launcher_opts)


def _sweep(config, grid, seeds, metric, out_dir: Path, overrides, launcher, nproc, echo,
           retry_failed, launcher_opts) -> dict:
    info = {"config": str(config) if config else None, "overrides": overrides, "grid": grid,
            "seeds": int(seeds), "launcher": launcher, "out_dir": str(out_dir)}
    rows = [_initial_row(run, config, overrides, retry_failed) for run in plan_runs(grid, seeds, out_dir)]
    position = {id(r): i + 1 for i, r in enumerate(rows)}
    write_summary(out_dir, info, rows, metric)
    for row in rows:
        if row["skipped"]:
            echo(_progress_line(position[id(row)], len(rows), row, metric))

    pending = [r for r in rows if not r["skipped"]]
    outcomes = _launch_all(pending, config, overrides, launcher, nproc, out_dir, echo, launcher_opts)
    for row, outcome in zip(pending, outcomes):
        _finish_row(row, outcome)
        echo(_progress_line(position[id(row)], len(rows), row, metric))
        write_summary(out_dir, info, rows, metric)

    summary = write_summary(out_dir, info, rows, metric)
    for line in _closing_lines(summary, metric):
        echo(line)
    return summary
