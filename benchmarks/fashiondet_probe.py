"""FashionDet: does the transfer probe rank checkpoints as full fine-tuning does? (`make bench-probe`)

PreDet and classification-only are pre-trained at the CPU recipe (800 iterations, seed 0) with
the transfer probe on (``probe.period`` 200: probes of the weights at 200, 400, 600 and 800
iterations, and one from random weights as the floor), keeping every checkpoint. Each of those
checkpoints is then fine-tuned at the benchmark's full 1x (``--seeds`` seeds, test split), and
the probe's ranking of the checkpoints is compared with the full fine-tuning's: Spearman's rank
correlation over all of them, and every pair of checkpoints the two order differently.
The probe's cost is stated as a fraction of the pre-training's time (at one CPU thread each).

Writes ``probe.json`` (format 1), ``probe.md`` and ``probe_curves.png`` to ``--results``.
Everything resumes: rerun the same command. Usage:
    python benchmarks/fashiondet_probe.py [--out runs/bench_probe] [--lanes 2]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fashiondet_benchmark as ladder  # noqa: E402

from predet.data.fashiondet import build_fashiondet, is_current_build  # noqa: E402
from predet.engine.metrics import read_metrics  # noqa: E402
from predet.tools.plots import plot_pretext_curves
from predet.tools.stats import mean_std  # noqa: E402
from predet.tools.sweep.run import sweep  # noqa: E402

FORMAT_VERSION = 1
RESULTS = Path("benchmarks/results/fashiondet/probe")
VARIANTS = ("predet", "cls_only")
PERIOD = 200
CHECKPOINTS = (200, 400, 600, 800)


def probe_overrides(data: Path, iters: int, subset: int) -> list[str]:
    det = data / "det"
    return [f"probe.data={det / 'annotations' / 'train.json'}", f"probe.images={det / 'images'}",
            f"probe.val={det / 'annotations' / 'val.json'}", f"probe.val_images={det / 'images'}",
            f"probe.period={PERIOD}", f"probe.iters={iters}", f"probe.subset={subset}",
            "probe.overrides=['train.num_workers=0']", "train.keep_checkpoints=0"]


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    def ranks(values):
        order = sorted(range(len(values)), key=lambda i: values[i])
        out = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2
            i = j + 1
        return out

    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return cov / var if var else float("nan")


def probe_points(run_dir: Path) -> tuple[dict[int, float], float | None, float]:
    """Probe val box AP by pre-training iteration, the floor, and the probes' seconds."""
    records = read_metrics(run_dir / "metrics.jsonl")
    points = {r["iteration"]: 100 * r["probe/bbox/AP"] for r in records if "probe/bbox/AP" in r}
    floor = [100 * r["probe/bbox/AP_scratch"] for r in records if "probe/bbox/AP_scratch" in r]
    seconds = sum(v for r in records for k, v in r.items() if k.startswith("probe/seconds"))
    return points, (floor[-1] if floor else None), seconds


def pretraining_seconds(run_dir: Path) -> float | None:
    timing = run_dir / "timing.json"
    return json.loads(timing.read_text())["seconds"] if timing.is_file() else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_probe"))
    parser.add_argument("--data", type=Path, default=Path("data/fashiondet"))
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--iters", type=int, default=100, help="probe.iters")
    parser.add_argument("--subset", type=int, default=200, help="probe.subset")
    parser.add_argument("--seeds", type=int, default=2, help="full 1x fine-tunings per checkpoint")
    parser.add_argument("--lanes", type=int, default=2)
    args = parser.parse_args(argv)
    if not is_current_build(args.data):
        build_fashiondet(args.data, size="small", seed=0, overwrite=True)
    extra = probe_overrides(args.data, args.iters, args.subset)
    for variant in VARIANTS:  # one at a time: its probes take the other core
        ladder.pretrain_task(args.out, args.data, variant, extra)()
    base = [*ladder.data_overrides(args.data), *ladder.FINETUNE_CUTS, "train.eval_period=0"]
    inits = [str(args.out / "pretrain" / v / "checkpoints" / f"checkpoint_{it:07d}.pth")
             for v in VARIANTS for it in CHECKPOINTS]
    summary = sweep(ladder.FINETUNE_CONFIG, {"init": inits}, seeds=args.seeds, out_dir=args.out / "full_1x",
                    overrides=base, jobs=args.lanes, threads=1, echo=ladder._echo("full 1x"))
    rows = []
    for variant in VARIANTS:
        run_dir = args.out / "pretrain" / variant
        points, floor, probe_seconds = probe_points(run_dir)
        for it in CHECKPOINTS:
            init = str(run_dir / "checkpoints" / f"checkpoint_{it:07d}.pth")
            values = [100 * r["test"]["bbox/AP"] for r in summary["runs"]
                      if r["settings"]["init"] == init and r["status"] == "done"]
            mean, std = mean_std(values)
            rows.append({"variant": variant, "iteration": it, "probe_val_box_AP": points.get(it),
                         "full_1x_test_box_AP": mean, "full_1x_std": std, "seeds": len(values)})
    ranked = [r for r in rows if r["probe_val_box_AP"] is not None and r["full_1x_test_box_AP"] is not None]
    probe = [r["probe_val_box_AP"] for r in ranked]
    full = [r["full_1x_test_box_AP"] for r in ranked]
    disagree = [(f"{a['variant']}@{a['iteration']}", f"{b['variant']}@{b['iteration']}")
                for a, b in itertools.combinations(ranked, 2)
                if (a["probe_val_box_AP"] - b["probe_val_box_AP"]) * (a["full_1x_test_box_AP"] - b["full_1x_test_box_AP"]) < 0]
    cost = {}
    for variant in VARIANTS:
        run_dir = args.out / "pretrain" / variant
        points, floor, probe_seconds = probe_points(run_dir)
        cost[variant] = {"probe_seconds": probe_seconds, "pretraining_seconds": pretraining_seconds(run_dir),
                         "probes": len(points) + (floor is not None), "floor_val_box_AP": floor}
    record = {"format_version": FORMAT_VERSION, "command": " ".join(sys.argv), "probe": {"iters": args.iters,
              "subset": args.subset, "period": PERIOD}, "rows": rows, "spearman": spearman(probe, full),
              "pairs": len(list(itertools.combinations(ranked, 2))), "disagreeing_pairs": disagree, "cost": cost}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "probe.json").write_text(json.dumps(record, indent=1) + "\n")
    plot_pretext_curves({ladder.LABELS[v]: args.out / "pretrain" / v for v in VARIANTS}, args.results / "probe_curves.png")
    write_markdown(record, args.results / "probe.md")
    print((args.results / "probe.md").read_text())
    return 0


def write_markdown(record: dict, path: Path) -> None:
    p = record["probe"]
    lines = ["# The transfer probe against full 1x fine-tuning (FashionDet)", "",
             f"Probe: {p['iters']} fine-tuning iterations on {p['subset']} training images, scored on val, every "
             f"{p['period']} pre-training iterations. Full: the benchmark's 1x (300 iterations), test split.", "",
             "| pre-training | iteration | probe val box AP | full 1x test box AP (mean ± std) |", "|---|---|---|---|"]
    for r in record["rows"]:
        probe = "n/a" if r["probe_val_box_AP"] is None else f"{r['probe_val_box_AP']:.1f}"
        full = "n/a" if r["full_1x_test_box_AP"] is None else (
            f"{r['full_1x_test_box_AP']:.1f}" + ("" if r["full_1x_std"] is None else f" ± {r['full_1x_std']:.1f}"))
        lines.append(f"| {r['variant']} | {r['iteration']} | {probe} | {full} |")
    lines += ["", f"Spearman's rank correlation over the {len(record['rows'])} checkpoints: {record['spearman']:.2f}; "
              f"{len(record['disagreeing_pairs'])} of {record['pairs']} pairs ordered differently: "
              + (", ".join(f"{a} / {b}" for a, b in record["disagreeing_pairs"]) or "none") + "."]
    for variant, c in record["cost"].items():
        share = (f"{100 * c['probe_seconds'] / c['pretraining_seconds']:.0f} %" if c["pretraining_seconds"] else "n/a")
        floor = "n/a" if c["floor_val_box_AP"] is None else f"{c['floor_val_box_AP']:.1f}"
        lines.append(f"- {variant}: {c['probes']} probes took {c['probe_seconds'] / 60:.1f} CPU-min beside a "
                     f"{(c['pretraining_seconds'] or 0) / 60:.1f}-min pre-training ({share}); floor (random weights) {floor}.")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
