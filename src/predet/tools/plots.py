"""Plots: AP against fine-tuning iterations (one curve per pre-training, from each run's
``evals.jsonl``), and a pre-training's held-out signals and transfer probe against its floors
(from ``metrics.jsonl``). PNGs through matplotlib's Agg backend."""

from __future__ import annotations

from pathlib import Path


def pretraining_order(runs: list[dict]) -> dict[str, int]:
    """Scratch first (as the paper does), then in the order the runs were given."""
    names = list(dict.fromkeys(r["pretraining"] for r in runs))
    names.sort(key=lambda n: n != "scratch")
    return {n: i for i, n in enumerate(names)}


def ap_curves(runs: list[dict], metric: str = "bbox/AP", split: str = "val") -> dict[str, tuple[list, list]]:
    """{curve label: (iterations, AP in percent)}, averaged over seeds at each iteration.

    One curve per pre-training; a pre-training fine-tuned with several schedules gets one
    curve per schedule (``label (3×)``).
    """
    schedules: dict[str, set] = {}
    for run in runs:
        schedules.setdefault(run["pretraining"], set()).add(run["schedule"])
    points: dict[str, dict[int, list[float]]] = {}
    order = pretraining_order(runs)
    for run in sorted(runs, key=lambda r: (order[r["pretraining"]], r["schedule_order"])):
        label = run["pretraining"]
        if len(schedules[label]) > 1:
            label += f" ({run['schedule']})"
        curve = points.setdefault(label, {})
        for rec in run["evals"]:
            value = rec.get(metric)
            if rec.get("split") == split and isinstance(value, (int, float)) and value >= 0:
                curve.setdefault(int(rec["iteration"]), []).append(100 * float(value))
    out = {}
    for label, curve in points.items():
        if curve:
            its = sorted(curve)
            out[label] = (its, [sum(curve[i]) / len(curve[i]) for i in its])
    return out


def save_figure(fig, out_path: str | Path, dpi: int) -> Path:
    """Write a matplotlib figure (folders made as needed) and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=dpi)
    plt.close(fig)
    return out_path


def plot_ap_curves(runs: list[dict], out_path: str | Path, metric: str = "bbox/AP",
                   split: str = "val", title: str = "") -> Path | None:
    """A PNG of ``metric`` against fine-tuning iterations; None (no file) when no run logged it."""
    curves = ap_curves(runs, metric, split)
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (its, values) in curves.items():
        ax.plot(its, values, marker="o", markersize=3, label=label)
    ax.set_xlabel("fine-tuning iteration")
    ax.set_ylabel(f"{metric} ({split}, %)")
    ax.set_title(title or f"{metric} on {split}, mean over seeds")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, out_path, dpi=120)


PRETEXT_TITLES = {  # signal -> panel title; each signal's floors come from predet.evaluation.pretext.FLOORS
    "cls_mAP": "weak-label mAP (true tags)",
    "crpn_recall@0.5": "CRPN recall@0.5",
    "nce_top1": "contrastive top-1 (colour-decorrelated views)",
}


def plot_pretext_curves(run_dirs: dict[str, str | Path], out_path: str | Path) -> Path | None:
    """One PNG with each pre-training's held-out signals against iterations, a panel per
    signal, its floors dashed: the learning ladder at a glance. None when nothing was logged."""
    from predet.engine.metrics import read_metrics
    from predet.evaluation.pretext import FLOORS

    curves = {}
    for label, run_dir in run_dirs.items():
        path = Path(run_dir) / "metrics.jsonl"
        if path.exists():
            curves[label] = [r for r in read_metrics(path) if any(k.startswith(("pretext/", "probe/")) for k in r)]
    if not any(curves.values()):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probed = any("probe/bbox/AP" in r for records in curves.values() for r in records)
    panels = len(PRETEXT_TITLES) + probed
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.8))
    if probed:
        _plot_probe(axes[-1], curves)
    for ax, (signal, title) in zip(axes, PRETEXT_TITLES.items()):
        floors = FLOORS[signal]
        for i, (label, records) in enumerate(curves.items()):
            colour = f"C{i}"
            for key, style, suffix in [(signal, "-", ""), *((f, "--", f" ({f[len(signal) + 1:].replace('_', ' ')})") for f in floors)]:
                points = [(r["iteration"], r[f"pretext/{key}"]) for r in records if f"pretext/{key}" in r]
                if points:
                    ax.plot(*zip(*points), style, color=colour, marker="o" if style == "-" else None,
                            markersize=3, label=f"{label}{suffix}")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("pre-training iteration")
        ax.set_ylim(0, 1)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    return save_figure(fig, out_path, dpi=110)


def _plot_probe(ax, curves: dict[str, list[dict]]) -> None:
    """The transfer probe's val box AP against pre-training iterations, each run's floor (the
    same probe from random weights) dashed."""
    for i, (label, records) in enumerate(curves.items()):
        points = sorted((r["iteration"], 100 * r["probe/bbox/AP"]) for r in records if "probe/bbox/AP" in r)
        floor = [100 * r["probe/bbox/AP_scratch"] for r in records if "probe/bbox/AP_scratch" in r]
        if points:
            ax.plot(*zip(*points), "-", color=f"C{i}", marker="o", markersize=3, label=label)
        if floor:
            ax.axhline(floor[-1], color=f"C{i}", linestyle="--", label=f"{label} (probe from random weights)")
    ax.set_title("transfer probe: val box AP (%)", fontsize=10)
    ax.set_xlabel("pre-training iteration")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6)
