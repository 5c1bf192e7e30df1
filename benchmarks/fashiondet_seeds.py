"""FashionDet: pre-training seeds and 3x settled (`make bench-seeds`).

Two questions the ladder (``fashiondet_benchmark.py``) leaves open, answered at its chosen
fine-tuning settings (``selection_*_1x.json``) without rerunning its selection:

1. **How much does a user's own pre-training vary?** PreDet and classification-only are
   pre-trained at the recipe with further pre-training seeds (``--pretrain-seeds``, default 1
   and 2; the ladder's runs are seed 0), each fine-tuned at 1x on test (``--finetune-seeds``
   each). The table pools the ladder's seed-0 runs with these: the mean and sample std over
   every (pre-training seed, fine-tuning seed) run, the std between pre-training seeds (of
   each pre-training seed's mean) beside it, and the 2-std answers recomputed on the pooled
   figures.
2. **Does PreDet raise where fine-tuning ends, or only get there sooner?** Scratch and PreDet
   (pre-training seed ``--pretrain-seed-3x``) at 3x, ``--seeds-3x`` seeds each, on test, with
   val AP every ``--curve-period`` iterations: the mean curves, the final test AP, and the
   fine-tuning iterations PreDet needs to reach scratch's final 3x val AP (time to accuracy,
   per seed and on the mean curve, linearly interpolated between evaluations).

Writes ``seeds.json`` (format 1), ``seeds.md``, ``curves_3x_bbox_AP.png`` and
``curves_3x_segm_AP.png`` to ``--results``. Runs go side by side, ``--lanes`` at a time, one CPU
thread each; everything resumes (rerun the same command); ``--report-only`` runs nothing.
Usage:
    python benchmarks/fashiondet_seeds.py [--pretrain-seeds 1 2] [--seeds-3x 3] [--lanes 2]
        [--out runs/bench_seeds]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fashiondet_benchmark as ladder  # noqa: E402

from predet.data.fashiondet import build_fashiondet, is_current_build  # noqa: E402
from predet.tools.plots import save_figure
from predet.tools.stats import seed_gap

FORMAT_VERSION = 1
RESULTS = Path("benchmarks/results/fashiondet")
METRICS = ("bbox/AP", "segm/AP")
SEED_VARIANTS = ("predet", "cls_only")


def seed_root(out: Path, seed: int) -> Path:
    """Each pre-training seed is its own ladder folder: ``pretrain/<variant>``, ``final/<variant>_1x``."""
    return out / f"pretrain_seed{seed}"


def init_of(out: Path, variant: str, seed: int) -> str:
    return str(seed_root(out, seed) / "pretrain" / variant / "checkpoints" / "model_final.pth")


def jobs_for(out: Path, data: Path, variants: list[str], pretrain_seeds: list[int], finetune_seeds: int,
             settings: dict[str, dict], base: list[str], seeds_3x: int, seed_3x: int, period: int) -> list[ladder.Job]:
    """In list order (a free lane takes the first job it may start): scratch's 3x runs (the
    longest, needing nothing), the pre-training PreDet's 3x runs start from, those 3x runs, the
    other pre-trainings (costliest first), then the 1x fine-tunings."""
    pretrainings = [(v, s) for v in sorted(variants, key=lambda v: not ladder.has_pretext(v)) for s in pretrain_seeds]
    if seeds_3x:
        if ("predet", seed_3x) not in pretrainings:
            raise ValueError(f"--pretrain-seed-3x {seed_3x} must be one of the PreDet pre-trainings run here")
        pretrainings.remove(("predet", seed_3x))
        pretrainings.insert(0, ("predet", seed_3x))
    pretrain_jobs = [ladder.Job(f"pretrain {v} seed{s}", ladder.pretrain_task(seed_root(out, s), data, v, [f"train.seed={s}"]))
                     for v, s in pretrainings]
    finetune_jobs = [ladder.Job(f"finetune {v} seed{s}", ladder.final_task(
        seed_root(out, s), v, "1x", init_of(out, v, s), settings.get(v, settings["predet"]), finetune_seeds, base, 0),
        [f"pretrain {v} seed{s}"]) for v, s in pretrainings]
    if not seeds_3x:
        return pretrain_jobs + finetune_jobs
    long_root = out / "schedule_3x"
    scratch_3x = ladder.Job("scratch 3x", ladder.final_task(
        long_root, "scratch", "3x", "scratch", settings["scratch"], seeds_3x, base, period))
    predet_3x = ladder.Job("predet 3x", ladder.final_task(
        long_root, "predet", "3x", init_of(out, "predet", seed_3x), settings["predet"], seeds_3x, base, period),
        [f"pretrain predet seed{seed_3x}"])
    return [scratch_3x, pretrain_jobs[0], predet_3x, *pretrain_jobs[1:], *finetune_jobs]


def _runs(summary_path: Path) -> list[dict]:
    """The finished runs of a sweep summary: seed, test metrics, and the run's folder (from the
    summary's own location, so a moved results tree still reads)."""
    summary = json.loads(summary_path.read_text())
    return [{"seed": r["seed"], "test": r["test"], "run_dir": summary_path.parent / r["name"] / f"seed{r['seed']}"}
            for r in summary["runs"] if r.get("status") == "done" and r.get("test")]


def _mean_std(values: list[float]) -> dict | None:
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values)}


def pooled(by_seed: dict[int, list[dict]], metric: str) -> dict | None:
    """Mean and sample std over every (pre-training seed, fine-tuning seed) run, and the std of
    the pre-training seeds' means (how much a user's own pre-training moves the result)."""
    values = [r["test"][metric] for runs in by_seed.values() for r in runs if r["test"].get(metric, -1) >= 0]
    stats = _mean_std(values)
    if stats is None:
        return None
    means = [statistics.fmean(r["test"][metric] for r in runs) for runs in by_seed.values() if runs]
    stats["pretrain_seeds"] = len(means)
    stats["between_pretrain_seeds_std"] = statistics.stdev(means) if len(means) > 1 else None
    stats["per_pretrain_seed"] = {str(s): statistics.fmean(r["test"][metric] for r in runs)
                                  for s, runs in sorted(by_seed.items()) if runs}
    return stats


compare = seed_gap  # the ladder's rule: a wins when its mean is above b's by more than twice the larger std


def val_curve(run_dir: Path, metric: str) -> list[tuple[int, float]]:
    from predet.tools.report import read_evals

    return [(int(r["iteration"]), float(r[metric])) for r in read_evals(run_dir / "evals.jsonl")
            if r.get("split") == "val" and isinstance(r.get(metric), (int, float)) and r[metric] >= 0]


def mean_curve(curves: list[list[tuple[int, float]]]) -> list[tuple[int, float]]:
    """The mean over seeds at the iterations every seed evaluated."""
    common = set.intersection(*(set(i for i, _ in c) for c in curves)) if curves else set()
    return [(i, statistics.fmean(dict(c)[i] for c in curves)) for i in sorted(common)]


def reaches(curve: list[tuple[int, float]], target: float) -> float | None:
    """The first fine-tuning iteration at which ``curve`` reaches ``target``, interpolated
    linearly between the two evaluations around it; None when it never does."""
    previous = None
    for iteration, value in curve:
        if value >= target:
            if previous is None:
                return float(iteration)  # at or before the first evaluation: its iteration
            (i0, v0) = previous
            return i0 + (iteration - i0) * (target - v0) / (value - v0)
        previous = (iteration, value)
    return None


def three_x(root: Path, metric: str) -> dict:
    """Test AP, val curves and time to accuracy of the 3x runs that have finished."""
    out = {}
    for name in ("scratch", "predet"):
        summary = ladder.run_dir_for(root, name, "3x") / "summary.json"
        if not summary.is_file() or not (runs := _runs(summary)):
            continue
        curves = [val_curve(r["run_dir"], metric) for r in runs]
        out[name] = {"test": _mean_std([r["test"][metric] for r in runs if r["test"].get(metric, -1) >= 0]),
                     "seeds": [r["seed"] for r in runs], "val_curves": curves, "val_mean_curve": mean_curve(curves)}
    if "scratch" in out and "predet" in out and out["scratch"]["val_mean_curve"]:
        target = out["scratch"]["val_mean_curve"][-1][1]
        final_iter = out["scratch"]["val_mean_curve"][-1][0]
        hit = reaches(out["predet"]["val_mean_curve"], target)
        out["time_to_accuracy"] = {
            "target_scratch_final_val": target, "scratch_iterations": final_iter,
            "predet_mean_curve_iterations": hit,
            "fraction_of_scratch": hit / final_iter if hit is not None else None,
            "predet_per_seed_iterations": [reaches(c, target) for c in out["predet"]["val_curves"]]}
        out["predet_vs_scratch_test"] = compare(out["predet"]["test"], out["scratch"]["test"])
    return out


def _pct(stat: dict | None, key: str = "std") -> str:
    if not stat:
        return "–"
    spread = f" ± {100 * stat[key]:.1f}" if stat.get(key) is not None else ""
    return f"{100 * stat['mean']:.1f}{spread}"


def report(out: Path, ladder_dir: Path, results: Path, variants: list[str], pretrain_seeds: list[int],
           command: str) -> dict:
    """seeds.json's record, seeds.md and the 3x curves, from whatever has finished."""
    results.mkdir(parents=True, exist_ok=True)
    one_x, missing = {}, []
    for variant in variants:
        by_seed = {0: _runs(ladder_dir / f"summary_{variant}_1x.json")}
        for seed in pretrain_seeds:
            summary = ladder.run_dir_for(seed_root(out, seed), variant, "1x") / "summary.json"
            if summary.is_file():
                by_seed[seed] = _runs(summary)
            else:
                missing.append(f"{variant} pre-training seed {seed}")
        one_x[variant] = {m: pooled(by_seed, m) for m in METRICS}
    scratch = {0: _runs(ladder_dir / "summary_scratch_1x.json")}
    one_x["scratch"] = {m: pooled(scratch, m) for m in METRICS}
    pairs = [("predet", "scratch"), ("predet", "cls_only"), ("cls_only", "scratch")]
    answers = {f"{a} vs {b}": {m: compare(one_x[a][m], one_x[b][m]) for m in METRICS}
               for a, b in pairs if a in one_x and b in one_x}
    long = {m: three_x(out / "schedule_3x", m) for m in METRICS}
    for metric in METRICS:
        plot_curves(long[metric], metric, results / f"curves_3x_{metric.replace('/', '_')}.png")
    record = {"format_version": FORMAT_VERSION, "command": command, "date": time.strftime("%Y-%m-%d"),
              "one_x_test": one_x, "answers_1x": answers, "three_x": long, "missing": missing}
    write_markdown(record, results / "seeds.md")
    return record


def write_markdown(record: dict, path: Path) -> None:
    lines = ["## 1x on test, pooled over pre-training and fine-tuning seeds", "",
             "| pre-training | box AP | mask AP | runs (pre-training seeds) | box AP std between pre-training seeds | "
             "box AP per pre-training seed |", "|---|---|---|---|---|---|"]
    for name, stats in record["one_x_test"].items():
        box, mask = stats["bbox/AP"], stats["segm/AP"]
        between = box.get("between_pretrain_seeds_std") if box else None
        per = ", ".join(f"{s}: {100 * v:.1f}" for s, v in (box or {}).get("per_pretrain_seed", {}).items())
        lines.append(f"| {ladder.LABELS[name]} | {_pct(box)} | {_pct(mask)} | {box['n'] if box else 0} "
                     f"({box['pretrain_seeds'] if box else 0}) | {'–' if between is None else f'{100 * between:.1f}'} | {per} |")
    lines += ["", "| comparison | box AP: gap / 2 std | wins by > 2 std? | mask AP: gap / 2 std | wins by > 2 std? |",
              "|---|---|---|---|---|"]
    for pair, by_metric in record["answers_1x"].items():
        cells = []
        for metric in METRICS:
            c = by_metric[metric]
            cells += (["–", "–"] if c is None else
                      [f"{100 * c['gap']:+.1f} / {100 * c['two_std']:.1f}", "**yes**" if c["wins_by_2std"] else "no"])
        a, b = pair.split(" vs ")
        lines.append(f"| {ladder.LABELS[a]} vs {ladder.LABELS[b]} | " + " | ".join(cells) + " |")
    lines += ["", "## 3x on test (val AP curves in curves_3x_*.png)", "",
              "| init | box AP | mask AP | seeds |", "|---|---|---|---|"]
    box3, mask3 = record["three_x"]["bbox/AP"], record["three_x"]["segm/AP"]
    for name in ("scratch", "predet"):
        if name in box3:
            lines.append(f"| {ladder.LABELS[name]} | {_pct(box3[name]['test'])} | {_pct(mask3[name]['test'])} | "
                         f"{len(box3[name]['seeds'])} |")
    for metric, long in record["three_x"].items():
        if c := long.get("predet_vs_scratch_test"):
            lines.append("")
            lines.append(f"- {metric} on test at 3x: PreDet - scratch {100 * c['gap']:+.1f}, 2 std {100 * c['two_std']:.1f}: "
                         + ("PreDet wins by more than 2 std" if c["wins_by_2std"] else "inside 2 std"))
        if tta := long.get("time_to_accuracy"):
            hit = tta["predet_mean_curve_iterations"]
            per_seed = ", ".join("never" if v is None else f"{v:.0f}" for v in tta["predet_per_seed_iterations"])
            lines.append("")
            lines.append(f"- {metric}: scratch's final val {100 * tta['target_scratch_final_val']:.1f} "
                         f"(mean, {tta['scratch_iterations']} iterations); PreDet's mean curve reaches it "
                         + ("never" if hit is None else f"at ~{hit:.0f} iterations ({100 * tta['fraction_of_scratch']:.0f} %)")
                         + f"; per seed: {per_seed}")
    if record["missing"]:
        lines += ["", f"Not run yet: {', '.join(record['missing'])}."]
    lines += ["", f"Command: `{record['command']}` ({record['date']})", ""]
    path.write_text("\n".join(lines))


def plot_curves(long: dict, metric: str, path: Path) -> None:
    """Val AP against fine-tuning iterations at 3x: each init's mean over seeds with the range of
    its seeds, scratch's final mean as a line."""
    if not any(name in long for name in ("scratch", "predet")):
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in ("scratch", "predet"):
        if name not in long or not long[name]["val_mean_curve"]:
            continue
        its = [i for i, _ in long[name]["val_mean_curve"]]
        per_seed = [[dict(c)[i] * 100 for c in long[name]["val_curves"]] for i in its]
        line, = ax.plot(its, [100 * v for _, v in long[name]["val_mean_curve"]], marker="o", markersize=3,
                        label=f"{ladder.LABELS[name]} (mean of {len(long[name]['seeds'])})")
        ax.fill_between(its, [min(v) for v in per_seed], [max(v) for v in per_seed], color=line.get_color(), alpha=0.2)
    if tta := long.get("time_to_accuracy"):
        ax.axhline(100 * tta["target_scratch_final_val"], color="grey", linestyle="--", label="scratch's final (3x)")
    ax.set_xlabel("fine-tuning iteration (3x = 900)")
    ax.set_ylabel(f"val {metric} (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench_seeds", help="run folders (resumable)")
    parser.add_argument("--data", default="data/fashiondet")
    parser.add_argument("--results", default=str(RESULTS / "seeds"), help="what gets committed")
    parser.add_argument("--variants", nargs="+", default=list(SEED_VARIANTS), choices=list(ladder.VARIANTS))
    parser.add_argument("--pretrain-seeds", nargs="*", type=int, default=[1, 2],
                        help="pre-training seeds run here (the ladder's are seed 0)")
    parser.add_argument("--finetune-seeds", type=int, default=1, help="1x fine-tuning seeds per new pre-training seed")
    parser.add_argument("--seeds-3x", type=int, default=3, help="seeds of each 3x run (0: no 3x runs)")
    parser.add_argument("--pretrain-seed-3x", type=int, default=1,
                        help="the pre-training seed PreDet's 3x runs start from (one of --pretrain-seeds)")
    parser.add_argument("--curve-period", type=int, default=150, help="val evaluation period of the 3x runs")
    parser.add_argument("--lanes", type=int, default=2, help="runs side by side, 1 thread each")
    parser.add_argument("--ladder", default=str(RESULTS), help="the ladder's results (seed-0 summaries, selections)")
    parser.add_argument("--finetune", nargs="*", default=ladder.FINETUNE_CUTS, metavar="key=value")
    parser.add_argument("--report-only", action="store_true", help="run nothing: report the finished runs")
    args = parser.parse_args(argv)
    start = time.time()
    out, data, results, ladder_dir = Path(args.out), Path(args.data), Path(args.results), Path(args.ladder)
    if not is_current_build(data):
        build_fashiondet(data, size="small", seed=0, overwrite=True)
    settings = {name: json.loads((ladder_dir / f"selection_{name}_1x.json").read_text())["chosen"]
                for name in ("scratch", "predet")}
    base = ladder.data_overrides(data) + list(args.finetune)
    if not args.report_only:
        ladder.run_jobs(jobs_for(out, data, args.variants, args.pretrain_seeds, args.finetune_seeds, settings, base,
                                 args.seeds_3x, args.pretrain_seed_3x, args.curve_period), args.lanes)
    command = " ".join([Path(sys.executable).name, *sys.argv])
    record = report(out, ladder_dir, results, args.variants, args.pretrain_seeds, command)
    record["hours_this_invocation"] = round((time.time() - start) / 3600, 2)
    record["finetune_settings"] = settings
    (results / "seeds.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    print((results / "seeds.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
