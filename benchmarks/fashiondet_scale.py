"""FashionDet pre-training scale curve: how much pre-training buys how much AP (`make bench-scale-curve`).

For each pre-training variant (PreDet, classification-only) and each budget (pre-training
iterations at the recipe's batch 32, cosine schedule over the budget), pre-train on the weak
set, then fine-tune at 1x on the detection split and evaluate on **test**, at the fine-tuning
settings the ladder chose on val (``selection_predet_1x.json``; classification-only takes
PreDet's, as in the ladder). Budgets in ``--seeded`` get ``--seeds`` fine-tuning seeds, the
others one. Scratch at 1x and 3x are the horizontal lines, read from the ladder's summaries.

Writes ``scale_curve.json`` (format 1), ``scale_curve.md`` and ``scale_curve.png`` (test box
and mask AP against pre-training images seen, and the lane-minutes each point cost) to
``--results``. Points from another run (the ladder's 800 iterations, say) join the curve with
``--point variant:iterations:SUMMARY_JSON[:PRETRAIN_METRICS_JSONL]``.

Runs go side by side, ``--lanes`` at a time, one CPU thread each, longest first; everything
resumes (rerun the same command). Usage:
    python benchmarks/fashiondet_scale.py [--budgets 200 400 1600] [--variants predet cls_only]
        [--seeded 1600] [--seeds 3] [--lanes 2] [--out runs/bench_scale]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fashiondet_benchmark as ladder  # noqa: E402

from predet.data.fashiondet import build_fashiondet, is_current_build  # noqa: E402
from predet.pretrain import load_pretrain_config  # noqa: E402
from predet.tools.plots import save_figure

FORMAT_VERSION = 1
RESULTS = Path("benchmarks/results/fashiondet")
METRICS = ("bbox/AP", "segm/AP")


def images_seen(iterations: int) -> int:
    return iterations * load_pretrain_config(ladder.PRETRAIN_CONFIG).train.batch_size


def point_dir(out: Path, iterations: int) -> Path:
    """Each budget is its own ladder folder: ``pretrain/<variant>`` and ``final/<variant>_1x``."""
    return out / f"iters{iterations}"


def plan(variants: list[str], budgets: list[int], seeded: list[int], seeds: int) -> list[tuple[str, int, int]]:
    """(variant, iterations, fine-tuning seeds) of every point, the costliest pre-training first
    (list scheduling then leaves the least idle lane at the end)."""
    points = [(v, b, seeds if b in seeded else 1) for v in variants for b in budgets]
    return sorted(points, key=lambda p: (-p[1], not ladder.has_pretext(p[0])))


def jobs_for(out: Path, data: Path, points, settings: dict, base: list[str]) -> list[ladder.Job]:
    jobs = []
    for variant, iterations, _ in points:
        root = point_dir(out, iterations)
        jobs.append(ladder.Job(f"pretrain {variant} {iterations}", ladder.pretrain_task(
            root, data, variant, [f"solver.max_iters={iterations}"])))
    for variant, iterations, seeds in points:
        root = point_dir(out, iterations)
        init = str(root / "pretrain" / variant / "checkpoints" / "model_final.pth")
        jobs.append(ladder.Job(f"finetune {variant} {iterations}",
                               ladder.final_task(root, variant, "1x", init, settings, seeds, base, 0),
                               [f"pretrain {variant} {iterations}"]))
    return jobs


def _summary_stats(summary_path: Path) -> tuple[dict, float]:
    """Test mean/std/n per metric of a sweep summary's (single) setting, and its fine-tuning
    lane-seconds (runs skipped as already done count nothing: ``None`` seconds)."""
    summary = json.loads(summary_path.read_text())
    setting = summary["settings"][0]
    stats = {m: setting["test"].get(m) for m in METRICS}
    seconds = sum(r.get("seconds") or 0.0 for r in summary.get("runs", []))
    return stats, seconds


def _pretrain_seconds(run_dir: Path) -> float | None:
    timing = run_dir / "timing.json"
    return json.loads(timing.read_text())["seconds"] if timing.is_file() else None


def _final_signals(metrics_path: Path) -> dict:
    """The last held-out pretext signals of a pre-training run."""
    if not metrics_path.is_file():
        return {}
    last = {}
    for record in ladder.read_metrics(metrics_path):
        if any(k.startswith("pretext/") for k in record):
            last = {k: v for k, v in record.items() if k.startswith("pretext/")}
    return last


def collect(out: Path, points, extra: list[str]) -> tuple[list[dict], list[str]]:
    """The finished points (this command's and ``extra``), and the names of the missing ones."""
    rows, missing = [], []
    for variant, iterations, _ in points:
        root = point_dir(out, iterations)
        summary = ladder.run_dir_for(root, variant, "1x") / "summary.json"
        if not summary.is_file():
            missing.append(f"{variant} {iterations}")
            continue
        stats, ft_seconds = _summary_stats(summary)
        run_dir = root / "pretrain" / variant
        rows.append({"variant": variant, "iterations": iterations, "images_seen": images_seen(iterations),
                     "test": stats, "pretrain_lane_minutes": _minutes(_pretrain_seconds(run_dir)),
                     "finetune_lane_minutes": _minutes(ft_seconds), "pretext": _final_signals(run_dir / "metrics.jsonl"),
                     "source": str(root)})
    for spec in extra:
        variant, iterations, summary, *metrics = spec.split(":")
        stats, _ = _summary_stats(Path(summary))
        rows.append({"variant": variant, "iterations": int(iterations), "images_seen": images_seen(int(iterations)),
                     "test": stats, "pretrain_lane_minutes": None, "finetune_lane_minutes": None,
                     "pretext": _final_signals(Path(metrics[0])) if metrics else {}, "source": summary})
    return sorted(rows, key=lambda r: (r["variant"], r["iterations"])), missing


def _minutes(seconds: float | None) -> float | None:
    return None if not seconds else round(seconds / 60, 1)


def fit_log2(rows: list[dict], metric: str) -> dict | None:
    """Least-squares AP = a + b * log2(images seen) over a variant's points: b is AP gained per
    doubling of pre-training."""
    xs = [math.log2(r["images_seen"]) for r in rows if r["test"].get(metric)]
    ys = [r["test"][metric]["mean"] for r in rows if r["test"].get(metric)]
    if len(xs) < 2:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return {"per_doubling": slope, "intercept": my - slope * mx, "points": len(xs)}


def meets(fit: dict | None, target: float | None) -> dict | None:
    """Where the fitted line reaches ``target`` (scratch's AP at 3x): log2 of the images seen,
    and the images and iterations when that is a number a run could reach (< 2**60)."""
    if fit is None or target is None or fit["per_doubling"] <= 0:
        return None
    log2_images = (target - fit["intercept"]) / fit["per_doubling"]
    images = 2 ** log2_images if log2_images < 60 else None
    return {"log2_images_seen": log2_images, "images_seen": images,
            "iterations": images / images_seen(1) if images else None}


def analyse(rows: list[dict], scratch: dict) -> dict:
    result = {}
    for metric in METRICS:
        per = {}
        for variant in sorted({r["variant"] for r in rows}):
            mine = [r for r in rows if r["variant"] == variant]
            fit = fit_log2(mine, metric)
            target = (scratch.get("3x") or {}).get(metric)
            best = max((r for r in mine if r["test"].get(metric)), key=lambda r: r["test"][metric]["mean"], default=None)
            per[variant] = {
                "fit": fit,
                "largest_budget": max(r["iterations"] for r in mine),
                "ap_at_largest": next(r["test"][metric] for r in sorted(mine, key=lambda r: -r["iterations"])
                                      if r["test"].get(metric)),
                "best_point": {"iterations": best["iterations"], **best["test"][metric]} if best else None,
                "gap_to_scratch_3x_at_largest": (None if not target else
                                                 max(mine, key=lambda r: r["iterations"])["test"][metric]["mean"]
                                                 - target["mean"]),
                "fit_meets_scratch_3x": meets(fit, target["mean"] if target else None),
            }
        result[metric] = per
    return result


def scratch_lines(paths: dict[str, Path]) -> dict:
    return {schedule: _summary_stats(p)[0] for schedule, p in paths.items() if p.is_file()}


def _fmt(stat: dict | None) -> str:
    if not stat:
        return "–"
    std = f" ± {100 * stat['std']:.1f}" if stat.get("std") is not None else ""
    return f"{100 * stat['mean']:.1f}{std} (n={stat['n']})"


def write_markdown(rows: list[dict], scratch: dict, analysis: dict, path: Path, command: str,
                   missing: list[str] = ()) -> None:
    lines = ["| pre-training | iterations | images seen | test box AP | test mask AP | pre-train lane-min | "
             "fine-tune lane-min | held-out CRPN recall@0.5 | held-out cls mAP |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p = r["pretext"]
        recall, cls_map = p.get("pretext/crpn_recall@0.5"), p.get("pretext/cls_mAP")
        lines.append(f"| {ladder.LABELS[r['variant']]} | {r['iterations']} | {r['images_seen']:,} | "
                     f"{_fmt(r['test']['bbox/AP'])} | {_fmt(r['test']['segm/AP'])} | "
                     f"{r['pretrain_lane_minutes'] or '–'} | {r['finetune_lane_minutes'] or '–'} | "
                     f"{'–' if recall is None else f'{recall:.3f}'} | {'–' if cls_map is None else f'{cls_map:.3f}'} |")
    for schedule, stats in scratch.items():
        lines.append(f"| scratch {schedule} (line) | – | – | {_fmt(stats['bbox/AP'])} | {_fmt(stats['segm/AP'])} | – | – | – | – |")
    lines += ["", "Fit of test AP against log2(images seen), per variant:", ""]
    for metric, per in analysis.items():
        for variant, a in per.items():
            fit, where = a["fit"], a["fit_meets_scratch_3x"]
            slope = f"{100 * fit['per_doubling']:+.2f} AP per doubling over {fit['points']} points" if fit else "too few points"
            reach = ""
            if where:
                reach = (f"; the line reaches scratch 3x at ~{where['iterations']:,.0f} iterations" if where["iterations"]
                         else f"; the line reaches scratch 3x only at 2^{where['log2_images_seen']:.0f} images")
            gap = a["gap_to_scratch_3x_at_largest"]
            gap_text = f"; at {a['largest_budget']} iterations {100 * gap:+.1f} AP from scratch 3x" if gap is not None else ""
            lines.append(f"- {metric}, {ladder.LABELS[variant]}: {slope}{gap_text}{reach}")
    if missing:
        lines += ["", f"Not run yet: {', '.join(missing)}."]
    lines += ["", f"Command: `{command}`", ""]
    path.write_text("\n".join(lines))


def plot(rows: list[dict], scratch: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, METRICS):
        for variant in sorted({r["variant"] for r in rows}):
            mine = [r for r in rows if r["variant"] == variant and r["test"].get(metric)]
            xs = [r["images_seen"] for r in mine]
            ys = [100 * r["test"][metric]["mean"] for r in mine]
            errs = [100 * (r["test"][metric].get("std") or 0.0) for r in mine]
            ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=ladder.LABELS[variant])
        for (schedule, stats), style in zip(sorted(scratch.items()), ("--", ":")):
            if stats.get(metric):
                ax.axhline(100 * stats[metric]["mean"], color="grey", linestyle=style, label=f"scratch {schedule}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("pre-training images seen (batch 32)")
        ax.set_ylabel(f"test {metric} (1x fine-tuning)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench_scale", help="run folders (resumable)")
    parser.add_argument("--data", default="data/fashiondet")
    parser.add_argument("--results", default=str(RESULTS / "scale"), help="what gets committed")
    parser.add_argument("--budgets", nargs="+", type=int, default=[200, 400, 800, 1600])
    parser.add_argument("--variants", nargs="+", default=["predet", "cls_only"], choices=list(ladder.VARIANTS))
    parser.add_argument("--seeded", nargs="*", type=int, default=[800, 1600],
                        help="budgets fine-tuned with --seeds seeds (the others with one)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--lanes", type=int, default=2, help="runs side by side, 1 thread each")
    parser.add_argument("--selection", default=str(RESULTS / "selection_predet_1x.json"),
                        help="the fine-tuning settings every point uses (the ladder's choice on val)")
    parser.add_argument("--scratch-1x", default=str(RESULTS / "summary_scratch_1x.json"))
    parser.add_argument("--scratch-3x", default=str(RESULTS / "lr_only_selection" / "summary_scratch_3x.json"))
    parser.add_argument("--point", action="append", default=[], metavar="VARIANT:ITERS:SUMMARY[:METRICS]",
                        help="a finished point from another run (repeatable)")
    parser.add_argument("--finetune", nargs="*", default=ladder.FINETUNE_CUTS, metavar="key=value")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: report the finished points (e.g. of several partial invocations)")
    args = parser.parse_args(argv)
    start = time.time()
    out, data, results = Path(args.out), Path(args.data), Path(args.results)
    if not is_current_build(data):
        build_fashiondet(data, size="small", seed=0, overwrite=True)
    settings = json.loads(Path(args.selection).read_text())["chosen"]
    base = ladder.data_overrides(data) + list(args.finetune)
    points = plan(args.variants, args.budgets, args.seeded, args.seeds)
    if not args.report_only:
        ladder.run_jobs(jobs_for(out, data, points, settings, base), args.lanes)

    rows, missing = collect(out, points, args.point)
    scratch = scratch_lines({"1x": Path(args.scratch_1x), "3x": Path(args.scratch_3x)})
    analysis = analyse(rows, scratch)
    command = " ".join([Path(sys.executable).name, *sys.argv])
    results.mkdir(parents=True, exist_ok=True)
    record = {"format_version": FORMAT_VERSION, "command": command, "date": time.strftime("%Y-%m-%d"),
              "hours_this_invocation": round((time.time() - start) / 3600, 2), "finetune_settings": settings,
              "finetune_overrides": list(args.finetune), "scratch": scratch, "points": rows, "missing": missing,
              "analysis": analysis}
    (results / "scale_curve.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    write_markdown(rows, scratch, analysis, results / "scale_curve.md", command, missing)
    plot(rows, scratch, results / "scale_curve.png")
    print((results / "scale_curve.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
