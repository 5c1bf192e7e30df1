"""FashionDet: successive halving against the exhaustive grid (`make bench-search`).

The paper searches lr x gamma x lr_mf (supplement Table 1: 5 x 3 x 2 = 30 points) for each model
and reports 3-seed means. Here, for scratch and PreDet (the CPU recipe's checkpoint), the same
Table-1 grid is searched two ways on FashionDet's val split at the benchmark's 1x (300
iterations at batch 4, the ladder's cuts):

* **exhaustive**: every point at the full 1x, one seed (``predet sweep --grid table1 --seeds 1``);
* **halving**: ``predet sweep --search halving`` (eta 3, 3 rungs: every point at 1/9 of the
  schedule, the best third at 1/3, the best third of those at the full 1x).

Each search's winner then runs 3 seeds at the full 1x with test evaluation (one folder per init,
so a setting both searches chose runs once). Selection runs do not evaluate the test split.
Reported: each search's chosen setting, its val AP, the winner's test box/mask AP (mean ± std
over 3 seeds), and the search's cost in CPU-minutes (the sum of its runs' wall time, one CPU
thread each), halving's as a fraction of the exhaustive grid's. Goal: the same or a better test
AP at <= 1/3 of the cost.

``--eta``, ``--rungs`` and ``--rung-val-subset`` (the short rungs scored on a fixed val subset)
run another halving beside the default one, in its own folder; the grid and the finals are read
back. Writes ``search.json`` (format 1) and ``search.md`` to ``--results``. Everything resumes: rerun the
same command (finished runs are read back, not rerun).
Usage:
    python benchmarks/fashiondet_search.py [--out runs/bench_search] [--predet CKPT] [--lanes 2]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fashiondet_benchmark as ladder  # noqa: E402

from predet.data.fashiondet import build_fashiondet, is_current_build  # noqa: E402
from predet.tools.stats import mean_std  # noqa: E402
from predet.tools.sweep.grid import expand_grid, parse_grid_args, run_name  # noqa: E402
from predet.tools.sweep.halving import halving, planned_cost  # noqa: E402
from predet.tools.sweep.run import sweep  # noqa: E402

FORMAT_VERSION = 1
RESULTS = Path("benchmarks/results/fashiondet/search")
GRID = ["table1"]
METRICS = ("bbox/AP", "segm/AP")
FINAL_SEEDS = 3


def base_overrides(data: Path) -> list[str]:
    """The ladder's 1x fine-tuning on FashionDet, no periodic evaluation."""
    return [*ladder.data_overrides(data), *ladder.FINETUNE_CUTS, "train.eval_period=0"]


def run_seconds(summary: dict) -> float:
    return sum(r.get("seconds") or 0 for r in summary["runs"])


def halving_folder(eta: int, rungs: int, val_subset: int) -> str:
    """``halving`` for the default search; other settings get their own folder, beside it."""
    if (eta, rungs, val_subset) == (3, 3, 0):
        return "halving"
    return f"halving_eta{eta}_rungs{rungs}" + (f"_val{val_subset}" if val_subset else "")


def searches(out: Path, init_name: str, init: str, base: list[str], lanes: int, eta: int, rungs: int,
             val_subset: int = 0) -> dict:
    """Both searches for one initialisation, then their winners' final seeds."""
    grid = parse_grid_args(GRID)
    search = [*base, f"init={init}", "data.test="]
    opts = dict(seeds=1, overrides=search, jobs=lanes, threads=1, echo=ladder._echo(f"{init_name}"))
    exhaustive = sweep(ladder.FINETUNE_CONFIG, grid, out_dir=out / init_name / "grid", **opts)
    halved = halving(ladder.FINETUNE_CONFIG, grid, out_dir=out / init_name / halving_folder(eta, rungs, val_subset),
                     eta=eta, rungs=rungs, val_subset=val_subset, **opts)
    winners = {"exhaustive": exhaustive["best"]["settings"], "halving": halved["winner"]}
    finals = {}
    for arm, settings in winners.items():
        finals[arm] = sweep(ladder.FINETUNE_CONFIG, {k: [v] for k, v in settings.items()}, seeds=FINAL_SEEDS,
                            out_dir=out / init_name / "final", overrides=[*base, f"init={init}"], jobs=lanes,
                            threads=1, echo=ladder._echo(f"{init_name} final"))
    return {"exhaustive": exhaustive, "halving": halved, "finals": finals, "winners": winners}


def summarize(init_name: str, found: dict, points: int, eta: int, rungs: int) -> dict:
    """What the tables show for one initialisation."""
    out = {}
    for arm in ("exhaustive", "halving"):
        settings = found["winners"][arm]
        final = found["finals"][arm]
        name = run_name(settings)
        runs = [r for r in final["runs"] if r["name"] == name and r["status"] == "done"]
        test = {}
        for metric in METRICS:
            values = [100 * r["test"][metric] for r in runs if metric in (r.get("test") or {})]
            mean, std = mean_std(values)
            test[metric] = {"mean": mean, "std": std, "n": len(values)}
        if arm == "exhaustive":
            summary = found["exhaustive"]
            search_seconds = run_seconds(summary)
            val = summary["best"]["mean"]
        else:
            record = found["halving"]
            search_seconds = sum(r["seconds"] for r in record["rungs"])
            val = record["best"]["mean"]
        out[arm] = {"setting": settings, "name": name, "search_val_bbox_AP": 100 * val,
                    "test": test, "search_cpu_minutes": search_seconds / 60,
                    "final_cpu_minutes": sum(r.get("seconds") or 0 for r in runs) / 60}
    out["halving_cost_fraction"] = out["halving"]["search_cpu_minutes"] / out["exhaustive"]["search_cpu_minutes"]
    out["planned_cost_fraction"] = planned_cost(points, eta, rungs) / points
    box = {arm: out[arm]["test"]["bbox/AP"] for arm in ("exhaustive", "halving")}
    out["halving_test_box_gap"] = box["halving"]["mean"] - box["exhaustive"]["mean"]
    out["goal_met"] = out["halving_cost_fraction"] <= 1 / 3 and out["halving_test_box_gap"] >= 0
    out["halving_rungs"] = [{k: r[k] for k in ("budget", "points", "kept", "seconds")} for r in found["halving"]["rungs"]]
    return out


def _cell(stat: dict) -> str:
    if stat["mean"] is None:
        return "n/a"
    return f"{stat['mean']:.1f}" + ("" if stat["std"] is None else f" ± {stat['std']:.1f}")


def write_markdown(record: dict, path: Path) -> None:
    lines = ["# Successive halving against the exhaustive grid (FashionDet, 1x)", "",
             f"Grid: supplement Table 1 ({record['points']} points: lr x gamma x lr_mf); halving eta "
             f"{record['eta']}, {record['rungs']} rungs (planned cost {100 * record['planned_cost_fraction']:.0f} % "
             "of the grid's runs), short rungs scored on "
             + (f"{record['rung_val_subset']} val images" if record.get("rung_val_subset") else "all of val")
             + ". Test AP: the chosen setting, 3 seeds at the full 1x.", "",
             "| init | search | chosen setting | val box AP (search) | test box AP | test mask AP | search CPU-min |",
             "|---|---|---|---|---|---|---|"]
    for init, s in record["inits"].items():
        for arm in ("exhaustive", "halving"):
            a = s[arm]
            lines.append(f"| {init} | {arm} | {a['name']} | {a['search_val_bbox_AP']:.1f} | {_cell(a['test']['bbox/AP'])} | "
                         f"{_cell(a['test']['segm/AP'])} | {a['search_cpu_minutes']:.0f} |")
    lines.append("")
    for init, s in record["inits"].items():
        lines.append(f"- {init}: halving cost {100 * s['halving_cost_fraction']:.0f} % of the exhaustive grid's, test box "
                     f"AP {s['halving_test_box_gap']:+.1f} against it: goal {'met' if s['goal_met'] else 'missed'}. "
                     "Rungs: " + "; ".join(f"{r['budget']:.3g} of 1x, {len(r['points'])} point(s) -> kept "
                                             f"{', '.join(r['kept'])}" for r in s["halving_rungs"]))
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_search"))
    parser.add_argument("--data", type=Path, default=Path("data/fashiondet"))
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--predet", default="", help="a PreDet checkpoint (default: pre-train the recipe into --out)")
    parser.add_argument("--inits", nargs="+", default=["scratch", "predet"], choices=["scratch", "predet"])
    parser.add_argument("--eta", type=int, default=3)
    parser.add_argument("--rungs", type=int, default=3)
    parser.add_argument("--rung-val-subset", type=int, default=0,
                        help="score the rungs below the full budget on this many val images (0: all)")
    parser.add_argument("--lanes", type=int, default=2, help="runs side by side, one CPU thread each")
    args = parser.parse_args(argv)
    if not is_current_build(args.data):
        build_fashiondet(args.data, size="small", seed=0, overwrite=True)
    predet = args.predet
    if "predet" in args.inits and not predet:
        ladder.pretrain_task(args.out, args.data, "predet", [])()
        predet = str(args.out / "pretrain" / "predet" / "checkpoints" / "model_final.pth")
    inits = {"scratch": "scratch", "predet": predet}
    base = base_overrides(args.data)
    points = len(expand_grid(parse_grid_args(GRID)))
    record = {"format_version": FORMAT_VERSION, "grid": GRID, "points": points, "eta": args.eta, "rungs": args.rungs,
              "rung_val_subset": args.rung_val_subset,
              "planned_cost_fraction": planned_cost(points, args.eta, args.rungs) / points,
              "predet_checkpoint": predet, "command": " ".join(sys.argv), "inits": {}}
    for name in args.inits:
        found = searches(args.out, name, inits[name], base, args.lanes, args.eta, args.rungs, args.rung_val_subset)
        record["inits"][name] = summarize(name, found, points, args.eta, args.rungs)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "search.json").write_text(json.dumps(record, indent=1) + "\n")
    write_markdown(record, args.results / "search.md")
    print((args.results / "search.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
