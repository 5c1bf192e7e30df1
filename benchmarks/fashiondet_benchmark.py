"""FashionDet: does PreDet pre-training pay off? (`make bench-fashiondet`)

1. Pre-train the learning ladder on the same weak set, iterations and seed: the supervised
   control (classification on the *clean* tags, what ImageNet pre-training is to the paper),
   classification-only on the noisy tags (lambda_rpn = lambda_roi = 0), pretext-only
   (lambda_cls = 0) and PreDet (all losses). Each logs its held-out signals beside their floors
   (weak-label mAP, CRPN recall, contrastive top-1); ``pretext_curves.png`` plots them.
2. Choose the fine-tuning lr, then gamma, on the **validation** split at 1x (one seed per grid
   point; each later stage varies its key around the best setting so far, ``--then``; ``--wide``
   runs the longer search that chose the config's defaults) for the initialisations in
   ``--select`` (scratch and PreDet); the other pre-trainings take PreDet's choice and every 3x
   run takes its initialisation's 1x choice.
3. With the chosen settings: every initialisation at 1x and scratch + PreDet at 3x, 3 seeds
   each, evaluated on the held-out **test** split (seed 0 of the chosen 1x setting is the
   selection run itself: same folder, not run twice).
4. Report (Table-3 layout, AP-vs-iterations plot) and the answers to the paper's questions.

Runs go side by side, ``--lanes`` at a time, one CPU thread each: on a 2-core machine two
single-thread runs finish sooner than the same runs one after another on both cores. Each run
starts as soon as what it needs has finished, so scratch's selection runs beside the
pre-trainings (``run_ladder``). ``--variants`` picks the ladder's rungs, ``--no-3x`` skips the
3x runs.
Everything resumes: rerun the same command after an interruption. Usage:
    python benchmarks/fashiondet_benchmark.py [--out runs/bench_fashiondet]
        [--results benchmarks/results/fashiondet] [--grid lr=0.02,0.04] [--seeds 3] [--lanes 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from predet.data.fashiondet import build_fashiondet, is_current_build
from predet.engine.metrics import read_metrics
from predet.engine.processes import thread_env
from predet.finetune import load_finetune_config
from predet.pretrain import weight_change
from predet.tools.demo import BENCHMARK_FINETUNE_CUTS
from predet.tools.plots import plot_pretext_curves
from predet.tools.report import write_report
from predet.tools.sweep.grid import parse_grid_args
from predet.tools.sweep.launch import run_command
from predet.tools.sweep.run import sweep

PRETRAIN_CONFIG = "pretrain/fashiondet_r18_cpu"
FINETUNE_CONFIG = "finetune/fashiondet_r18_cpu"
VARIANTS = {  # name -> overrides ({weak} is the weak set's folder)
    "predet": [],
    "supervised": ["data.train={weak}/clean_labels.jsonl", "loss.lambda_rpn=0", "loss.lambda_roi=0"],
    "cls_only": ["loss.lambda_rpn=0", "loss.lambda_roi=0"],
    "pretext_only": ["loss.lambda_cls=0"],
}
LABELS = {"predet": "PreDet", "supervised": "supervised (clean tags)", "cls_only": "classification-only",
          "pretext_only": "pretext-only", "scratch": "scratch"}
# The cuts that make the ladder's fine-tuning runs fit a 2-core CPU (README of the results
# folder); the demo's small profile fine-tunes with the same cuts.
FINETUNE_CUTS = list(BENCHMARK_FINETUNE_CUTS)
# The default selection checks the neighbourhood of the config's lr 0.04, gamma 0.5 (which a
# wide search chose for both scratch and PreDet: lr, then warm-up, then gamma, then lr again, 12
# runs per initialisation; results README): lr one step either side, then gamma around the best
# lr; 5 runs per initialisation, so the ladder fits 3 hours on 2 cores. gamma 1 is no decay.
GRID = ["lr=0.02,0.04,0.08"]
THEN_STAGES = ["gamma=0.3,0.5,1"]
# ``--wide``: that search, from the config defaults of its time (lr 0.02, gamma 0.1, warm-up 1000).
WIDE_GRID = ["lr=0.01,0.02,0.04,0.08"]
WIDE_THEN_STAGES = ["solver.warmup_iters=0,1000,12000", "gamma=0.1,0.3,0.5,1", "lr=0.01,0.02,0.04,0.08"]
WIDE_START = ["solver.gamma=0.1", "solver.warmup_iters=1000"]  # lr: its first stage is a full grid


def pretrain_task(out: Path, data: Path, name: str, extra: list[str]):
    """A no-argument function that pre-trains one variant in its own process (once)."""
    weak = data / "weak"

    def task():
        run_dir = out / "pretrain" / name
        final = run_dir / "checkpoints" / "model_final.pth"
        if final.exists():
            print(f"== pre-training {name}: done ({final})", flush=True)
            return
        print(f"== pre-training {name} -> {run_dir} (log: {run_dir / 'log.txt'})", flush=True)
        cmd = [sys.executable, "-m", "predet", "pretrain", "--config", str(PRETRAIN_CONFIG),
               f"data.train={weak / 'labels.jsonl'}", f"data.vocab={weak / 'vocab.json'}",
               f"data.val={weak / 'heldout_clean.jsonl'}", f"train.run_dir={run_dir}", "train.resume=true",
               "train.progress=false", *[o.format(weak=weak) for o in VARIANTS[name]], *extra]
        outcome = run_command(cmd, run_dir / "log.txt", thread_env(1))
        if outcome["returncode"] != 0:
            raise RuntimeError(f"pre-training {name} failed:\n{outcome['error']}")
        # the CPU cost a scale curve plots (the invocation that finished it: a resumed run's
        # earlier part is not counted)
        (run_dir / "timing.json").write_text(json.dumps({"seconds": outcome["seconds"], "threads": 1}) + "\n")
        print(f"== pre-training {name}: finished in {outcome['seconds'] / 60:.1f} min", flush=True)

    return task


def has_pretext(name: str) -> bool:
    """Variants that train the CRPN or the contrastive head: several times a classification step."""
    return name in VARIANTS and not {"loss.lambda_rpn=0", "loss.lambda_roi=0"} <= set(VARIANTS[name])


def initialisations(out: Path, variants: list[str]) -> dict[str, str]:
    inits = {name: str(out / "pretrain" / name / "checkpoints" / "model_final.pth") for name in variants}
    inits["scratch"] = "scratch"
    return inits


def data_overrides(data: Path) -> list[str]:
    det = data / "det"
    return [f"data.train={det / 'annotations' / 'train.json'}", f"data.train_images={det / 'images'}",
            f"data.val={det / 'annotations' / 'val.json'}", f"data.val_images={det / 'images'}",
            f"data.test={det / 'annotations' / 'test.json'}", f"data.test_images={det / 'images'}",
            "train.progress=false"]


def _echo(prefix: str):
    return lambda text: print(f"[{prefix}] {text}", flush=True)


def run_dir_for(out: Path, name: str, schedule: str) -> Path:
    return out / "final" / f"{name}_{schedule}"


def config_value(key: str, base: list[str]):
    """The fine-tuning config's value of a dotted key under the benchmark's overrides."""
    node = load_finetune_config(FINETUNE_CONFIG, base)
    for part in key.split("."):
        node = getattr(node, part)
    return node


def select_in_stages(stages: list[dict], run_grid: Callable[[dict], dict], default: Callable[[str], object]
                     ) -> tuple[dict, list[dict]]:
    """Coordinate search on val: the first stage is a full grid; each later stage varies one key
    around the best setting so far (its current value is not run again) and replaces that
    setting only when it scores higher. ``run_grid`` runs a sweep grid and returns its summary.

    Every key any stage searches is in every grid, the later stages' keys pinned at their config
    default in the first: a run's folder is named by its grid, so it must name each searched
    value, or a changed config default would silently change what a finished folder means.
    Returns the chosen settings and every stage's summary."""
    settings, best, summaries = {}, None, []
    for i, stage in enumerate(stages):
        if i > 0 and len(stage) != 1:
            raise ValueError(f"selection stage {stage} must vary one key (only the first stage is a full grid)")
        if i == 0:
            later = [k for s in stages[1:] for k in s if k not in stage]
            grid = {**stage, **{k: [default(k)] for k in dict.fromkeys(later)}}
        else:
            (key, values), = stage.items()
            current = settings.get(key, default(key))
            if not (values := [v for v in values if v != current]):
                continue
            grid = {k: values if k == key else [v] for k, v in {**settings, key: current}.items()}
        summary = run_grid(grid)
        summaries.append(summary)
        found = summary.get("best") or {}
        if found and (best is None or found["mean"] > best["mean"]):
            settings, best = dict(found["settings"]), found
    if best is None:
        raise RuntimeError("no selection run finished")
    return settings, summaries


def selection_task(out: Path, name: str, init: str, stages: list[dict], base: list[str]):
    """A no-argument function returning the setting with the best val bbox/AP at 1x (one seed
    per grid point), chosen stage by stage (``select_in_stages``)."""
    def task() -> dict:
        run_dir = run_dir_for(out, name, "1x")

        def run_grid(grid: dict) -> dict:
            return sweep(FINETUNE_CONFIG, grid, seeds=1, out_dir=run_dir, threads=1, echo=_echo(f"select {name}"),
                         overrides=[f"init={init}", "schedule=1x", "train.eval_period=0", *base])

        try:
            settings, summaries = select_in_stages(stages, run_grid, lambda key: config_value(key, base))
        except RuntimeError as exc:
            raise RuntimeError(f"{name}: {exc}: see {run_dir}") from None
        best = next(s["best"] for s in summaries if s.get("best") and s["best"]["settings"] == settings)
        record = {"chosen": settings, "best": best, "stages": summaries}
        (run_dir / "selection.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
        return settings

    return task


def final_task(out: Path, name: str, schedule: str, init: str, settings: dict, seeds: int, base: list[str],
               curve_period: int):
    """A no-argument function running ``seeds`` seeds of one initialisation and schedule on test."""
    def task() -> Path:
        grid = {k: [v] for k, v in settings.items()}
        run_dir = run_dir_for(out, name, schedule)
        period = curve_period if schedule != "1x" else 0  # 1x: its end point is enough
        sweep(FINETUNE_CONFIG, grid, seeds=seeds, out_dir=run_dir, threads=1, echo=_echo(f"{name} {schedule}"),
              overrides=[f"init={init}", f"schedule={schedule}", f"train.eval_period={period}", *base])
        return run_dir

    return task


@dataclass
class Job:
    name: str
    run: Callable[[], object]
    after: list[str] = field(default_factory=list)  # jobs that must have finished first


def run_jobs(jobs: list[Job], lanes: int) -> None:
    """List scheduling: every free lane takes the first job, in list order, whose ``after`` jobs
    have all finished. A failed job skips everything that depends on it; the others still run,
    and the first failure is raised at the end."""
    names = {job.name for job in jobs}
    for job in jobs:
        if missing := [a for a in job.after if a not in names]:
            raise ValueError(f"job {job.name!r} waits for unknown jobs {missing}")
    cond = threading.Condition()
    pending, done, failed = list(jobs), set(), {}

    def take() -> Job | None:
        with cond:
            while pending:
                for job in pending:
                    if any(a in failed for a in job.after):
                        pending.remove(job)
                        failed[job.name] = RuntimeError(f"{job.name}: skipped, a job it needs failed")
                        cond.notify_all()
                        break
                    if all(a in done for a in job.after):
                        pending.remove(job)
                        return job
                else:
                    cond.wait()
            return None

    def lane() -> None:
        while (job := take()) is not None:
            try:
                job.run()
            except BaseException as exc:  # noqa: BLE001 - recorded, raised once every lane stops
                with cond:
                    failed[job.name] = exc
                    cond.notify_all()
            else:
                with cond:
                    done.add(job.name)
                    cond.notify_all()

    threads = [threading.Thread(target=lane, daemon=True) for _ in range(max(1, lanes))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failed:
        raise next(iter(failed.values()))


# The 1x runs the comparisons need come first (PreDet vs scratch and classification-only,
# the supervised control vs scratch), so an interrupted ladder has its answers soonest.
FINAL_ORDER = ["scratch", "predet", "cls_only", "supervised", "pretext_only"]


def final_priority(name: str) -> int:
    return FINAL_ORDER.index(name) if name in FINAL_ORDER else len(FINAL_ORDER)


def run_ladder(out: Path, data: Path, variants: list[str], pretrain_extra: list[str], stages: list[dict], select: list[str],
               base: list[str], seeds: int, curve_period: int, lanes: int, long_schedule: bool = True,
               seeds_3x: int | None = None) -> tuple[dict, list[Path]]:
    """Pre-training, selection on val and the final runs on test, as jobs over ``lanes`` lanes.

    Jobs are taken in this order as soon as what they need has finished: the pre-trainings
    (pretext variants, the longest, first), the selections (scratch's needs no pre-training, so
    it starts beside them), the 3x runs, then the 1x runs. An initialisation without its own
    selection takes PreDet's choice (or the first selected one's). Returns the settings chosen
    per initialisation and the final run folders.
    """
    inits = initialisations(out, variants)
    selected = [n for n in inits if n in select]
    if not selected:
        raise ValueError(f"--select {select} names none of the initialisations {list(inits)}")
    source = "predet" if "predet" in selected else selected[0]  # whose choice the others take
    long_names = [n for n in ("scratch", "predet") if n in inits] if long_schedule else []
    chosen: dict[str, dict] = {}

    def select_settings(name: str) -> None:
        chosen[name] = selection_task(out, name, inits[name], stages, base)()
        print(f"== chosen on val for {name}: {json.dumps(chosen[name])}", flush=True)

    def final(name: str, schedule: str) -> None:
        if name not in chosen:
            chosen[name] = chosen[source]
        count = seeds_3x if schedule == "3x" and seeds_3x is not None else seeds
        final_task(out, name, schedule, inits[name], chosen[name], count, base, curve_period)()

    def needs(name: str) -> list[str]:
        return [f"pretrain {name}"] if name != "scratch" else []

    by_cost = sorted(variants, key=lambda n: not has_pretext(n))
    jobs = [Job(f"pretrain {n}", pretrain_task(out, data, n, pretrain_extra)) for n in by_cost]
    jobs += [Job(f"select {n}", lambda n=n: select_settings(n), needs(n)) for n in sorted(selected, key=lambda n: n != "scratch")]
    jobs += [Job(f"final {n} 3x", lambda n=n: final(n, "3x"), [f"select {n}"]) for n in long_names]
    jobs += [Job(f"final {n} 1x", lambda n=n: final(n, "1x"),
                 [f"select {n}"] if n in selected else needs(n) + [f"select {source}"])
             for n in sorted(inits, key=final_priority)]
    run_jobs(jobs, lanes)
    plan = [(n, "1x") for n in inits] + [(n, "3x") for n in long_names]
    return chosen, [run_dir_for(out, n, s) for n, s in sorted(plan, key=lambda p: (p[1], list(LABELS).index(p[0])))]


def _stats(summary_path: Path, split: str, metric: str) -> dict | None:
    settings = json.loads(summary_path.read_text())["settings"]
    return settings[0][split].get(metric) if settings else None


def answers(dirs: list[Path], metric: str = "bbox/AP") -> dict:
    """The paper's questions, from the test AP (mean, sample std over seeds) of this
    invocation's final runs only: a folder left by an earlier plan (3x at other settings, say)
    would answer with settings the rest of the table did not use."""
    stats = {}
    for run_dir in dirs:
        entry = _stats(run_dir / "summary.json", "test", metric) if (run_dir / "summary.json").is_file() else None
        if entry:
            stats[run_dir.name] = entry

    def beats(a, b):
        if a not in stats or b not in stats:
            return None
        gap = stats[a]["mean"] - stats[b]["mean"]
        spread = 2 * max(stats[a]["std"] or 0.0, stats[b]["std"] or 0.0)
        return {"gap_ap": gap, "two_std": spread, "wins": gap > spread}

    return {
        f"test_{metric}": stats,
        "predet_1x_beats_cls_only_1x_by_2std": beats("predet_1x", "cls_only_1x"),
        "predet_1x_beats_scratch_1x_by_2std": beats("predet_1x", "scratch_1x"),
        "supervised_1x_beats_scratch_1x_by_2std": beats("supervised_1x", "scratch_1x"),
        "pretext_only_1x_beats_scratch_1x_by_2std": beats("pretext_only_1x", "scratch_1x"),
        "predet_1x_beats_pretext_only_1x_by_2std": beats("predet_1x", "pretext_only_1x"),
        "predet_1x_reaches_scratch_3x": (stats["predet_1x"]["mean"] >= stats["scratch_3x"]["mean"]
                                         if {"predet_1x", "scratch_3x"} <= set(stats) else None),
    }


def chosen_setting_dir(run_dir: Path) -> Path:
    """The folder of the setting a final run used: the report must not re-pick among the
    selection's one-seed grid points that share ``run_dir`` (a lucky seed 0 would win)."""
    best = json.loads((run_dir / "summary.json").read_text()).get("best")
    if not best:
        raise RuntimeError(f"{run_dir / 'summary.json'}: no finished setting")
    return run_dir / best["name"]


def selection_plan(grid: list[str] | None, then: list[list[str]] | None, wide: bool) -> tuple[list[dict], list[str]]:
    """The selection stages (``--grid`` then each ``--then``, or the defaults: ``GRID`` and
    ``THEN_STAGES``, or the wide search's) and the overrides its search starts from."""
    first = grid or (WIDE_GRID if wide else GRID)
    later = then or [[t] for t in (WIDE_THEN_STAGES if wide else THEN_STAGES)]
    return [parse_grid_args(first)] + [parse_grid_args(t) for t in later], list(WIDE_START) if wide else []


def selection_grid(stages: list[dict], defaults: dict) -> dict[str, list]:
    """Every value each key was tried at over all stages, its config default included (a later
    stage does not rerun the default: the best setting so far stands for it)."""
    values: dict[str, set] = {}
    for stage in stages:
        for key, tried in stage.items():
            values.setdefault(key, set()).update(tried)
    return {k: sorted(v | ({defaults[k]} if k in defaults else set())) for k, v in values.items()}


def chosen_at_grid_edge(chosen: dict, grid: dict, defaults: dict | None = None) -> dict[str, list[str]]:
    """Per initialisation, the grid keys whose chosen value is the grid's smallest or largest:
    a choice at the edge means the grid should be widened before the result is trusted.
    ``defaults`` stand for keys a choice leaves at the config's value (a later stage that
    found nothing better)."""
    edges = {}
    for name, settings in chosen.items():
        settings = {**(defaults or {}), **settings}
        keys = [k for k, v in settings.items() if len(grid.get(k, [])) > 1 and v in (min(grid[k]), max(grid[k]))]
        if keys:
            edges[name] = keys
    return edges


def pretraining_diagnostics(out: Path) -> dict:
    """Per pre-training: held-out pretext curves and how far each part moved from its init."""
    result = {}
    for name in [p.name for p in sorted((out / "pretrain").iterdir()) if p.name in VARIANTS]:
        run_dir = out / "pretrain" / name
        records = read_metrics(run_dir / "metrics.jsonl")
        result[name] = {
            "pretext": [{"iteration": r["iteration"], **{k: v for k, v in r.items() if k.startswith("pretext/")}}
                        for r in records if any(k.startswith("pretext/") for k in r)],
            "final_losses": next((r["losses"] for r in reversed(records) if "losses" in r), {}),
            "weight_change": weight_change(run_dir / "checkpoints" / "model_final.pth"),
        }
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench_fashiondet", help="run folders (resumable)")
    parser.add_argument("--data", default="data/fashiondet")
    parser.add_argument("--results", default="benchmarks/results/fashiondet", help="what gets committed")
    parser.add_argument("--grid", nargs="+", default=None,
                        help=f"first selection stage on val, a full grid (lr at batch 16; gamma, lr_mf or any "
                        f"key also work; default: {' '.join(GRID)})")
    parser.add_argument("--then", nargs="+", action="append", metavar="key=v1,v2",
                        default=None, help="a later selection stage: one key varied around the best setting "
                        f"so far (repeatable; default: {' '.join(f'--then {t}' for t in THEN_STAGES)})")
    parser.add_argument("--wide", action="store_true",
                        help="the wide search that chose the config's lr and gamma: from lr 0.02, gamma 0.1, "
                        f"--grid {' '.join(WIDE_GRID)} {' '.join(f'--then {t}' for t in WIDE_THEN_STAGES)} "
                        "(12 runs per initialisation instead of 5; about 4 hours without 3x)")
    parser.add_argument("--select", nargs="+", default=["scratch", "predet"], choices=list(LABELS),
                        help="initialisations that get their own selection (the others take PreDet's)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        help="pre-training variants of the ladder (scratch is always run)")
    parser.add_argument("--no-3x", dest="long_schedule", action="store_false",
                        help="skip the 3x runs of scratch and PreDet (the stretch goal's comparison)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--seeds-3x", type=int, default=None,
                        help="seeds of the 3x runs (default: --seeds); 1 gives the stretch goal a first answer in 75 min")
    parser.add_argument("--lanes", type=int, default=os.cpu_count() or 1, help="runs side by side, 1 thread each")
    parser.add_argument("--curve-period", type=int, default=450,
                        help="val evaluation period of the 3x runs (the AP-vs-iterations plot)")
    parser.add_argument("--pretrain", nargs="*", default=[], metavar="key=value",
                        help="overrides for every pre-training run (e.g. solver.max_iters=400)")
    parser.add_argument("--finetune", nargs="*", default=FINETUNE_CUTS, metavar="key=value",
                        help=f"overrides for every fine-tuning run (default: {' '.join(FINETUNE_CUTS)})")
    args = parser.parse_args(argv)
    start = time.time()
    out, data, results = Path(args.out), Path(args.data), Path(args.results)
    if not is_current_build(data):
        build_fashiondet(data, size="small", seed=0, overwrite=True)
    stages, start = selection_plan(args.grid, args.then, args.wide)
    base = data_overrides(data) + list(args.finetune) + start
    defaults = {k: config_value(k, base) for stage in stages[1:] for k in stage}
    grid = selection_grid(stages, defaults)
    chosen, dirs = run_ladder(out, data, args.variants, args.pretrain, stages, args.select, base, args.seeds,
                              args.curve_period, args.lanes, args.long_schedule, args.seeds_3x)
    print(f"== chosen on val: {json.dumps(chosen)}", flush=True)

    results.mkdir(parents=True, exist_ok=True)
    plot_pretext_curves({LABELS[name]: out / "pretrain" / name for name in args.variants}, results / "pretext_curves.png")
    labels = {str(d): LABELS[d.name.rsplit("_", 1)[0]] for d in dirs}
    paths = write_report([chosen_setting_dir(d) for d in dirs], results, split="test", labels=labels)
    for d in dirs:
        shutil.copy(d / "summary.json", results / f"summary_{d.name}.json")
        if (d / "selection.json").exists():
            shutil.copy(d / "selection.json", results / f"selection_{d.name}.json")
    summary = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
               "hours_this_invocation": (time.time() - start) / 3600,
               "finetune_overrides": list(args.finetune), "pretrain_overrides": list(args.pretrain),
               "fashiondet_format_version": json.loads((data / "fashiondet.json").read_text())["format_version"],
               "chosen_settings": chosen, "selection_grid": grid,
               "chosen_at_grid_edge": chosen_at_grid_edge(chosen, grid, defaults),
               "bbox": answers(dirs), "mask": answers(dirs, "segm/AP"),
               "pretraining": pretraining_diagnostics(out)}
    (results / "answers.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    print(paths["text"])
    print(json.dumps(summary, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
