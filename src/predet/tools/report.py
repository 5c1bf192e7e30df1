"""``predet report``: fine-tuning results as the supplement's Tables 3/4, plus AP curves.

Rows are pre-training × schedule; columns box AP/AP50/AP75 and mask AP/AP50/AP75 of Mask
R-CNN, and RetinaNet's box AP/AP50/AP75 where such runs exist. Cells are percent,
``mean ± std`` over seeds (sample std; one seed prints no ±). Where a cell has runs of several
settings (a sweep folder), the one with the best validation box AP is shown, as the paper
reports its best setting, and the choice is listed under the table.

A run's pre-training label is the name of the pre-training run its ``init`` came from (see
``predet.config.choices.pretraining_label``), unless ``labels.json`` or ``--label DIR=NAME`` says
otherwise.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Iterable

import yaml

from predet.config import flatten, paper_tables, run_only
from predet.config.choices import pretraining_label
from predet.tools.plots import plot_ap_curves, pretraining_order
from predet.tools.stats import mean_std

# (table column suffix, results key), in the supplement's column order
_METRICS = [("ap_bbox", "bbox/AP"), ("ap50_bbox", "bbox/AP50"), ("ap75_bbox", "bbox/AP75"),
            ("ap_mask", "segm/AP"), ("ap50_mask", "segm/AP50"), ("ap75_mask", "segm/AP75")]
ARCH_METRICS = {"mask_rcnn": _METRICS, "faster_rcnn": _METRICS[:3], "retinanet": _METRICS[:3]}
ARCH_LABELS = {"mask_rcnn": "mask-RCNN", "faster_rcnn": "faster-RCNN", "retinanet": "RetinaNet"}
METRIC_LABELS = {"ap_bbox": "AP^bbox", "ap50_bbox": "AP50^bbox", "ap75_bbox": "AP75^bbox",
                 "ap_mask": "AP^mask", "ap50_mask": "AP50^mask", "ap75_mask": "AP75^mask"}
SELECTION_METRIC = "bbox/AP"


# --------------------------------------------------------------------------- reading runs


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_evals(path: Path) -> list[dict]:
    """evals.jsonl records, one per (iteration, split); a repeated one (after a resume) keeps the last."""
    records: dict[tuple, dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut by a crash
            records[(rec.get("iteration"), rec.get("split"))] = rec
    return sorted(records.values(), key=lambda r: (r.get("iteration") or 0, str(r.get("split"))))


def schedule_label(config: dict, results: dict | None = None) -> str:
    """``1x`` -> ``1×`` as the paper prints it; no named schedule -> the run's length."""
    name = str(config.get("schedule") or "").strip()
    if name:
        return name[:-1] + "×" if name[:-1].isdigit() and name.lower().endswith("x") else name
    solver = (results or {}).get("solver") or config.get("solver") or {}
    return f"{solver.get('max_iters', '?')} it"


def _schedule_order(config: dict) -> float:
    from predet.config.schedules import get_schedule

    try:
        return get_schedule(config.get("schedule") or "").max_iters
    except ValueError:
        return float((config.get("solver") or {}).get("max_iters") or 0)


def _find_run_dirs(root: Path) -> list[Path]:
    """Fine-tuning run folders under ``root`` (itself included): they hold results or evals."""
    found = {p.parent for name in ("results.json", "evals.jsonl") for p in root.rglob(name)}
    if (root / "results.json").is_file() or (root / "evals.jsonl").is_file():
        found.add(root)
    return sorted(d for d in found if (d / "config.yaml").is_file())


def parse_labels(items: Iterable[str]) -> dict[str, str]:
    """``["runs/a=PreDet", ...]`` (the ``--label`` option) -> {key: name}."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--label {item!r} is not of the form DIR=NAME")
        key, name = item.rsplit("=", 1)
        out[key] = name
    return out


def _label_rules(label_dirs: list[Path], labels: dict[str, str] | None) -> list[tuple[str, str, Path]]:
    """(key, name, base folder) in priority order: ``labels`` first, then each ``labels.json``."""
    rules = [(k, v, Path.cwd()) for k, v in (labels or {}).items()]
    for d in label_dirs:
        data = _read_json(d / "labels.json")
        if isinstance(data, dict):
            rules += [(str(k), str(v), d) for k, v in data.items()]
    return rules


def _apply_labels(run_dir: Path, init: str, default: str, rules) -> str:
    """The most specific folder rule containing the run wins; else a rule naming its init or label."""
    run_dir = run_dir.resolve()
    best, depth = None, -1
    for key, name, base in rules:
        folder = (base / key).resolve()
        if (folder == run_dir or folder in run_dir.parents) and len(folder.parts) > depth:
            best, depth = name, len(folder.parts)
    if best is not None:
        return best
    for key, name, _ in rules:
        if key in (init, default):
            return name
    return default


def collect_runs(dirs: Iterable[str | Path], labels: dict[str, str] | None = None,
                 label_dirs: Iterable[str | Path] = ()) -> list[dict]:
    """Every fine-tuning run under ``dirs``, with its config, results, evals and labels.

    ``labels`` maps a folder (a run, a sweep, or any parent), an ``init`` path or a default
    label to the pre-training name to print; a ``labels.json`` in any of ``dirs`` or
    ``label_dirs`` does the same (its folder keys relative to itself), ``labels`` winning.
    """
    dirs = [Path(d) for d in dirs]
    for d in dirs:
        if not d.exists():
            raise FileNotFoundError(f"{d}: no such folder")
    rules = _label_rules(dirs + [Path(d) for d in label_dirs], labels)
    runs, seen = [], set()
    for root in dirs:
        for run_dir in _find_run_dirs(root):
            if run_dir.resolve() in seen:
                continue
            seen.add(run_dir.resolve())
            config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
            results = _read_json(run_dir / "results.json")
            init = str(config.get("init", "scratch"))
            flat = {k: v for k, v in flatten(config).items() if not isinstance(v, dict)}
            setting = {k: v for k, v in flat.items() if not run_only(k) and k != "train.seed"}  # seeds: one setting
            runs.append({
                "run_dir": str(run_dir), "config": config, "results": results,
                "evals": read_evals(run_dir / "evals.jsonl"),
                "pretraining": _apply_labels(run_dir, init, pretraining_label(init), rules),
                "schedule": schedule_label(config, results), "schedule_order": _schedule_order(config),
                "arch": (config.get("model") or {}).get("arch", "mask_rcnn"),
                "seed": flat.get("train.seed", 0),
                "setting": json.dumps(setting, sort_keys=True, default=str),
            })
    return runs


# --------------------------------------------------------------------------- tables


def _value(run: dict, split: str, key: str) -> float | None:
    value = ((run.get("results") or {}).get(split) or {}).get(key)
    return float(value) if isinstance(value, (int, float)) and value >= 0 else None


def format_cell(values: list[float]) -> str:
    """Fractions -> ``41.0 ± 1.4`` in percent; one value -> ``41.0``; none -> ``-``."""
    if not values:
        return "-"
    mean, std = mean_std([100 * v for v in values])
    return f"{mean:.1f}" if std is None else f"{mean:.1f} ± {std:.1f}"


def _setting_diff(chosen: dict, others: list[dict]) -> str:
    """The config keys in which the chosen setting differs from the other candidates."""
    mine = json.loads(chosen["setting"])
    keys = sorted({k for o in others for k, v in json.loads(o["setting"]).items() if mine.get(k) != v})
    return ", ".join(f"{k}={mine.get(k)}" for k in keys) or "(same config)"


def best_setting_runs(runs: list[dict]) -> tuple[list[dict], list[str]]:
    """Per (pre-training, schedule, arch): the runs of the setting best on val box AP.

    Returns those runs and one note per cell where a choice was made.
    """
    cells: dict[tuple, dict[str, list[dict]]] = {}
    for run in runs:
        key = (run["pretraining"], run["schedule"], run["arch"])
        cells.setdefault(key, {}).setdefault(run["setting"], []).append(run)
    chosen, notes = [], []
    for (pre, sched, arch), settings in cells.items():
        groups = list(settings.values())
        if len(groups) > 1:
            def score(group):
                vals = [v for v in (_value(r, "val", SELECTION_METRIC) for r in group) if v is not None]
                return sum(vals) / len(vals) if vals else float("-inf")
            best = max(groups, key=score)  # max keeps the first of equals
            others = [g[0] for g in groups if g is not best]
            notes.append(f"{pre}, {sched}, {ARCH_LABELS.get(arch, arch)}: best of {len(groups)} settings on "
                         f"val {SELECTION_METRIC}: {_setting_diff(best[0], others)}")
            groups = [best]
        chosen += groups[0]
    return chosen, notes


def table_columns(runs: list[dict]) -> dict[str, str]:
    """{column key: header}: the supplement's keys and headers, for the detectors in ``runs``."""
    archs = {r["arch"] for r in runs}
    columns = {"pre-training": "pre-training", "sched.": "sched."}
    for arch in ("mask_rcnn", "faster_rcnn", "retinanet"):
        if arch in archs:
            for suffix, _ in ARCH_METRICS[arch]:
                columns[f"{arch}_{suffix}"] = f"{ARCH_LABELS[arch]} {METRIC_LABELS[suffix]}"
    return columns


def build_table(runs: list[dict], split: str = "test") -> tuple[list[dict], dict[str, str]]:
    """Rows (pre-training × schedule) of formatted cells, and the {key: header} columns.

    Each row also carries ``stats`` ({column: {"mean", "std", "n"}} in percent) for programs.
    """
    runs, _ = best_setting_runs(runs)
    columns = table_columns(runs)
    order = pretraining_order(runs)
    rows: dict[tuple, dict] = {}
    for run in sorted(runs, key=lambda r: (order[r["pretraining"]], r["schedule_order"], r["schedule"])):
        key = (run["pretraining"], run["schedule"])
        rows.setdefault(key, {"pre-training": run["pretraining"], "sched.": run["schedule"], "_runs": []})
        rows[key]["_runs"].append(run)
    out = []
    for row in rows.values():
        stats = {}
        for arch, metrics in ARCH_METRICS.items():
            arch_runs = [r for r in row["_runs"] if r["arch"] == arch]
            for suffix, result_key in metrics:
                col = f"{arch}_{suffix}"
                if col not in columns:
                    continue
                values = [v for v in (_value(r, split, result_key) for r in arch_runs) if v is not None]
                row[col] = format_cell(values)
                mean, std = mean_std([100 * v for v in values])
                stats[col] = {"mean": mean, "std": std, "n": len(values)}
        row["stats"] = stats
        row["runs"] = [r["run_dir"] for r in row.pop("_runs")]
        out.append(row)
    return out, columns


# --------------------------------------------------------------------------- report


def format_report(rows: list[dict], columns: dict[str, str], split: str, notes: list[str]) -> str:
    """The Markdown page: the table, what its cells are, and which settings were chosen."""
    seeds = sorted({s["n"] for r in rows for s in r["stats"].values() if s["n"]})
    text = [f"# Fine-tuning results ({split} split)", "",
            paper_tables.format_table(rows, columns), "",
            f"AP in percent on the {split} split, mean ± sample std over seeds "
            f"(seeds per cell: {', '.join(map(str, seeds)) or 'none'}); '-' = no result."]
    if notes:
        text += ["", "Settings chosen on the validation split:", *[f"- {n}" for n in notes]]
    return "\n".join(text) + "\n"


def per_category_table(runs: list[dict], split: str = "test") -> str:
    """Markdown: box AP per category (rows) for each (pre-training, schedule, detector) of
    ``runs`` (columns), mean over seeds, from the ``per_category`` table in results.json;
    empty when no run has one."""
    groups: dict[str, list[list[dict]]] = {}
    for run in runs:
        rows = ((run.get("results") or {}).get("per_category") or {}).get(split)
        if rows:
            label = f"{run['pretraining']} {run['schedule']} {ARCH_LABELS.get(run['arch'], run['arch'])}"
            groups.setdefault(label, []).append(rows)
    if not groups:
        return ""
    categories = {}
    for tables in groups.values():
        for rows in tables:
            for row in rows:
                categories.setdefault(row["category_id"], row["name"])
    lines = [f"# Box AP per category ({split} split)", "",
             "| id | category | " + " | ".join(groups) + " |", "|---:|---|" + "---:|" * len(groups)]
    for cat_id, name in categories.items():
        cells = []
        for tables in groups.values():
            values = [r["bbox/AP"] for rows in tables for r in rows
                      if r["category_id"] == cat_id and r.get("bbox/AP", -1) >= 0]
            cells.append(format_cell(values))
        lines.append(f"| {cat_id} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(dirs: Iterable[str | Path], out_dir: str | Path, split: str = "test",
                 labels: dict[str, str] | None = None) -> dict:
    """Table (Markdown + CSV) and AP-curve PNGs for the runs under ``dirs``; returns the paths.

    Keys: ``markdown``, ``csv``, ``plots`` (list), ``text`` (the Markdown, for printing) and
    ``per_category`` (the per-category AP page, None when the runs have no such table).
    """
    dirs = list(dirs)
    out_dir = Path(out_dir)
    runs = collect_runs(dirs, labels, label_dirs=[out_dir])
    if not runs:
        raise FileNotFoundError(f"no fine-tuning runs (config.yaml + results.json or evals.jsonl) under "
                                f"{', '.join(map(str, dirs))}")
    chosen, notes = best_setting_runs(runs)
    rows, columns = build_table(chosen, split)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = format_report(rows, columns, split, notes)
    md = out_dir / f"table_{split}.md"
    md.write_text(text)
    csv_path = out_dir / f"table_{split}.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(list(columns.values()))
        writer.writerows([[row.get(k, "") for k in columns] for row in rows])
    per_category = per_category_table(chosen, split)
    per_category_path = None
    if per_category:
        per_category_path = out_dir / f"per_category_{split}.md"
        per_category_path.write_text(per_category)
    plots = []
    for arch, metrics in ARCH_METRICS.items():
        arch_runs = [r for r in chosen if r["arch"] == arch]
        for _, metric in metrics[:: 3]:  # box AP, and mask AP where there are masks
            name = f"curves_{arch}_{metric.replace('/', '_')}.png"
            path = plot_ap_curves(arch_runs, out_dir / name, metric, "val",
                                  f"{ARCH_LABELS[arch]}: {metric} on val, mean over seeds")
            if path is not None:
                plots.append(path)
    return {"markdown": md, "csv": csv_path, "plots": plots, "text": text, "per_category": per_category_path}


def paper_report() -> str:
    """The supplement's own Tables 3 and 4, to read beside ours."""
    return "\n\n".join(paper_tables.format_paper_table(name) for name in ("table3", "table4")) + "\n"
