"""A sweep's grid: ``key=v1,v2`` arguments in the command line's grammar (``predet.config``), with
short names for the searched keys (``lr``, ``gamma``, ``lr_mf``, ``schedule``, ``init``, ``wd``)
and the supplement's named grids; the runs they expand to, their folder names and overrides."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any, Iterable

from predet.config import ConfigError, parse_override
from predet.config.choices import pretraining_label

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


def plan_runs(grid: dict, seeds: int, out_dir: str | Path) -> list[dict]:
    """One entry per (grid point, seed), grid point by grid point; names must be unique."""
    return plan_points(expand_grid(grid), seeds, out_dir)


def plan_points(points: list[dict], seeds: int, out_dir: str | Path) -> list[dict]:
    """:func:`plan_runs` for a list of settings (a halving rung's survivors, not a product)."""
    if int(seeds) < 1:
        raise ConfigError(f"--seeds must be at least 1, got {seeds}")
    runs, owner = [], {}
    for settings in points:
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
