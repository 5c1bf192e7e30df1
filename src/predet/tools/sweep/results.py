"""A sweep's results: each run's ``results.json``, the mean and std of every metric per grid
point, the setting chosen on val, and ``summary.json``/``summary.csv``."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

from predet.checkpoint.atomic import atomic_write
from predet.tools.stats import mean_std


def checkpoint_iteration(run_dir: Path) -> int | None:
    """The iteration of the run's latest checkpoint, None when there is none."""
    from predet.checkpoint.io import latest_checkpoint

    path = latest_checkpoint(run_dir)
    if path is None:
        return None
    step = re.search(r"(\d+)", path.stem)
    return int(step.group(1)) if step else 0


def read_results(run_dir: Path) -> dict | None:
    try:
        return json.loads((Path(run_dir) / "results.json").read_text())
    except (OSError, ValueError):
        return None


def metric_value(row: dict, split: str, metric: str) -> float | None:
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
                values = [v for v in (metric_value(r, split, key) for r in done) if v is not None]
                if values:
                    mean, std = mean_std(values)
                    stats[key] = {"mean": mean, "std": std, "n": len(values)}
            entry[split] = stats
        out.append(entry)
    return out


def ranked_settings(settings: list[dict], metric: str = "bbox/AP") -> list[dict]:
    """Aggregated settings (``aggregate_settings``) that have a val ``metric``, best first; ties
    keep grid order. Only ``val`` is looked at: the test split is for reporting."""
    scored = [(-entry["val"][metric]["mean"], i, entry) for i, entry in enumerate(settings)
              if entry.get("val", {}).get(metric, {}).get("mean") is not None]
    return [entry for _, _, entry in sorted(scored, key=lambda t: t[:2])]


def select_best(rows: list[dict], metric: str = "bbox/AP") -> dict:
    """The grid point with the highest validation ``metric`` (mean over its finished seeds):
    its aggregate (see ``aggregate_settings``) plus ``metric``, ``mean`` and ``std``; ``{}``
    when no run has the metric."""
    ranked = ranked_settings(aggregate_settings(rows), metric)
    if not ranked:
        return {}
    stats = ranked[0]["val"][metric]
    return {**ranked[0], "metric": metric, "mean": stats["mean"], "std": stats["std"]}


def write_summary(out_dir: Path, info: dict, rows: list[dict], metric: str, name: str = "summary") -> dict:
    """``NAME.json`` (runs, per-setting mean/std, best) and ``NAME.csv`` (one row a run)."""
    summary = {**info, "metric": metric, "selection_split": "val", "runs": rows,
               "settings": aggregate_settings(rows), "best": select_best(rows, metric)}
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / f"{name}.json", lambda f: f.write(json.dumps(summary, indent=1, default=str) + "\n"), mode="w")
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
    atomic_write(out_dir / f"{name}.csv", lambda f: csv.writer(f).writerows(lines), mode="w")
    return summary
