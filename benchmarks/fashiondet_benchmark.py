"""FashionDet: does PreDet pre-training pay off? (`make bench-fashiondet`)

1. Pre-train three variants on the same weak set, iterations and seed: PreDet (all losses),
   classification-only (lambda_rpn = lambda_roi = 0) and pretext-only (lambda_cls = 0).
2. For each initialisation (those three + scratch) choose lr / gamma / lr_mf on the
   **validation** split (one seed per grid point, 1x).
3. With the chosen settings: every initialisation at 1x and scratch + PreDet at 3x, 3 seeds
   each, evaluated on the held-out **test** split.
4. Report (Table-3 layout, AP-vs-iterations plot) and the answers to the paper's questions.

Everything resumes: rerun the same command after an interruption. Usage:
    python benchmarks/fashiondet_benchmark.py [--out runs/bench_fashiondet]
        [--results benchmarks/results/fashiondet] [--grid lr=0.02,0.04 lr_mf=1,4] [--seeds 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from predet.data.fashiondet import build_fashiondet
from predet.demo import is_current_build
from predet.pretrain import load_pretrain_config, pretrain
from predet.report import write_report
from predet.sweep import parse_grid_args, sweep

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN_CONFIG = ROOT / "configs" / "pretrain" / "fashiondet_r18_cpu.yaml"
FINETUNE_CONFIG = ROOT / "configs" / "finetune" / "fashiondet_r18_cpu.yaml"
VARIANTS = {  # name -> loss overrides
    "predet": [],
    "cls_only": ["loss.lambda_rpn=0", "loss.lambda_roi=0"],
    "pretext_only": ["loss.lambda_cls=0"],
}
LABELS = {"predet": "PreDet", "cls_only": "classification-only", "pretext_only": "pretext-only", "scratch": "scratch"}


def pretrain_variants(out: Path, data: Path, extra: list[str]) -> dict[str, str]:
    weak = data / "weak"
    inits = {}
    for name, losses in VARIANTS.items():
        run_dir = out / "pretrain" / name
        print(f"== pre-training {name} -> {run_dir}", flush=True)
        pretrain(load_pretrain_config(PRETRAIN_CONFIG, [
            f"data.train={weak / 'labels.jsonl'}", f"data.vocab={weak / 'vocab.json'}",
            f"data.val={weak / 'heldout.jsonl'}", f"train.run_dir={run_dir}", "train.resume=true",
            "train.progress=false", *losses, *extra,
        ]))
        inits[name] = str(run_dir / "checkpoints" / "model_final.pth")
    inits["scratch"] = "scratch"
    return inits


def data_overrides(data: Path, test: bool) -> list[str]:
    det = data / "det"
    out = [f"data.train={det / 'annotations' / 'train.json'}", f"data.train_images={det / 'images'}",
           f"data.val={det / 'annotations' / 'val.json'}", f"data.val_images={det / 'images'}",
           "train.progress=false"]
    if test:
        out += [f"data.test={det / 'annotations' / 'test.json'}", f"data.test_images={det / 'images'}"]
    return out


def choose_settings(out: Path, inits: dict, grid: dict, base: list[str]) -> dict[str, dict]:
    """Per initialisation, the grid point with the best val bbox/AP at 1x (one seed)."""
    chosen = {}
    for name, init in inits.items():
        print(f"== choosing lr/gamma/lr_mf for {name} on val", flush=True)
        summary = sweep(FINETUNE_CONFIG, grid, seeds=1, out_dir=out / "select" / name,
                        overrides=[f"init={init}", "schedule=1x", *base])
        if not summary["best"]:
            raise RuntimeError(f"no selection run for {name} finished: see {out / 'select' / name / 'summary.json'}")
        chosen[name] = summary["best"]["settings"]
    return chosen


def final_runs(out: Path, inits: dict, chosen: dict, seeds: int, base: list[str]) -> list[Path]:
    dirs = []
    plan = [(name, "1x") for name in inits] + [("scratch", "3x"), ("predet", "3x")]
    for name, schedule in plan:
        settings = [f"{k}={v}" for k, v in chosen[name].items()]
        run_dir = out / "final" / f"{name}_{schedule}"
        print(f"== {name} at {schedule}, {seeds} seeds: {' '.join(settings)}", flush=True)
        sweep(FINETUNE_CONFIG, {}, seeds=seeds, out_dir=run_dir,
              overrides=[f"init={inits[name]}", f"schedule={schedule}", *settings, *base])
        dirs.append(run_dir)
    return dirs


def answers(out: Path) -> dict:
    """The paper's questions, from the final runs' test bbox/AP (mean, sample std over seeds)."""
    stats = {}
    for summary_path in sorted((out / "final").glob("*/summary.json")):
        entry = json.loads(summary_path.read_text())["settings"][0]["test"].get("bbox/AP")
        if entry:
            stats[summary_path.parent.name] = entry
    def beats(a, b):
        if a not in stats or b not in stats:
            return None
        gap = stats[a]["mean"] - stats[b]["mean"]
        spread = 2 * max(stats[a]["std"] or 0.0, stats[b]["std"] or 0.0)
        return {"gap_ap": gap, "two_std": spread, "wins": gap > spread}
    return {
        "test_bbox_AP": stats,
        "predet_1x_beats_cls_only_1x_by_2std": beats("predet_1x", "cls_only_1x"),
        "predet_1x_beats_scratch_1x_by_2std": beats("predet_1x", "scratch_1x"),
        "predet_1x_reaches_scratch_3x": (stats["predet_1x"]["mean"] >= stats["scratch_3x"]["mean"]
                                         if {"predet_1x", "scratch_3x"} <= set(stats) else None),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench_fashiondet", help="run folders (resumable)")
    parser.add_argument("--data", default="data/fashiondet")
    parser.add_argument("--results", default="benchmarks/results/fashiondet", help="what gets committed")
    parser.add_argument("--grid", nargs="+", default=["lr=0.02,0.04", "lr_mf=1,4"],
                        help="selection grid on val (lr at batch 16)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--pretrain", nargs="*", default=[], metavar="key=value",
                        help="overrides for every pre-training run (e.g. solver.max_iters=400)")
    parser.add_argument("--finetune", nargs="*", default=[], metavar="key=value",
                        help="overrides for every fine-tuning run (e.g. schedule_scale=0.0005)")
    args = parser.parse_args(argv)
    start = time.time()
    out, data, results = Path(args.out), Path(args.data), Path(args.results)
    if not is_current_build(data):
        build_fashiondet(data, size="small", seed=0, overwrite=True)
    inits = pretrain_variants(out, data, args.pretrain)
    chosen = choose_settings(out, inits, parse_grid_args(args.grid), data_overrides(data, False) + args.finetune)
    dirs = final_runs(out, inits, chosen, args.seeds, data_overrides(data, True) + args.finetune)

    results.mkdir(parents=True, exist_ok=True)
    labels = {str(d): LABELS[d.name.rsplit("_", 1)[0]] for d in dirs}
    paths = write_report(dirs, results, split="test", labels=labels)
    for d in dirs:
        shutil.copy(d / "summary.json", results / f"summary_{d.name}.json")
    summary = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "hours": (time.time() - start) / 3600,
               "chosen_settings": chosen, **answers(out)}
    (results / "answers.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    print(paths["text"])
    print(json.dumps(summary, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
