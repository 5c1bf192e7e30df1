"""``predet demo`` / ``make demo``: the whole pipeline on FashionDet, on a CPU.

FashionDet data -> PreDet pre-training on the weak set (the recipe) -> Mask R-CNN fine-tuning on
a low-data split from that checkpoint and from scratch, at the same budget and over four seeds
each -> a table, a plot of AP against fine-tuning iterations, and the gap between the two beside
its own seed noise. Every step resumes, so an interrupted demo picks up where it stopped.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from predet.data.fashiondet import build_fashiondet, is_current_build
from predet.pretrain import load_pretrain_config, pretrain
from predet.tools.report import write_report

logger = logging.getLogger(__name__)

PRETRAIN_CONFIG = "pretrain/fashiondet_r18_cpu"  # shipped configs, by name (predet.config.shipped_config)
FINETUNE_CONFIG = "finetune/fashiondet_r18_cpu"

# The FashionDet benchmark's 1x: 300 iterations at batch 4 (the config's CPU 1x is 450), 64
# sampled RoIs per image instead of 128, a 64-channel mask head instead of 128.
BENCHMARK_FINETUNE_CUTS = ["schedule_scale=0.000833333", "model.box_batch_size_per_image=64", "model.mask_head_dim=64"]

# "small" is the recipe: the shipped CPU pre-training config in full (800 iterations: at 200 the
# demo's one-seed gap was inside seed noise and once reversed), then fine-tuning cut like the
# benchmark's 1x, four seeds per initialisation, two at a time side by side (one thread each),
# so the printed gap comes with a noise estimate four runs can give (two gave stds of 0.1 to
# 1.6 on the same arm). About 20 minutes on 2 cores from a fresh clone, set-up included (README).
# "tiny" shrinks everything to a smoke test.
PROFILES = {
    "small": {"pretrain": ["train.eval_period=200"], "finetune": BENCHMARK_FINETUNE_CUTS, "seeds": 4},
    "tiny": {
        "pretrain": [
            "data.views.size=64", "data.views.num_queries=4", "data.views.min_query_px=6",
            "model.fpn_channels=32", "model.box_head_dim=64", "model.crpn_hidden=32",
            "model.anchor_sizes=[8,16,32,64,128]", "model.crpn_anchors_per_query=64",
            "model.pre_nms_top_n=32", "model.post_nms_top_n=8", "model.rois_per_query=4",
            "solver.max_iters=6", "solver.warmup_iters=2", "train.batch_size=4", "train.num_workers=0",
            "train.eval_period=3", "train.checkpoint_period=3",
        ],
        "finetune": [
            "data.subset=32", "schedule_scale=0.00005", "model.min_size=96", "model.max_size=96",
            "model.fpn_channels=32", "model.box_head_dim=64", "model.mask_head_dim=16",
            "model.anchor_sizes=[8,16,32,64,128]", "model.rpn_pre_nms_top_n_train=100",
            "model.rpn_post_nms_top_n_train=50", "model.rpn_pre_nms_top_n_test=100",
            "model.rpn_post_nms_top_n_test=50", "model.box_batch_size_per_image=32",
            "model.detections_per_image=20", "train.batch_size=2", "train.num_workers=0",
            "train.eval_period=4", "train.checkpoint_period=4",
        ],
        "seeds": 2,
    },
}


@dataclass
class DemoResult:
    table: str
    plot: Path
    report_dir: Path
    runs: dict[str, Path]  # each initialisation's sweep folder (one run per fine-tuning seed)
    payoff: str = ""  # PreDet against scratch, with the seeds' noise


def run_demo(out: str | Path = "runs/demo", data: str | Path = "data/fashiondet", size: str = "small",
             seed: int = 0, progress: bool = True) -> DemoResult:
    """Run (or resume) the demo; returns the printed table, the payoff lines and the plot's path."""
    from predet.tools.sweep.run import sweep

    if size not in PROFILES:
        raise ValueError(f"demo size must be one of {sorted(PROFILES)}, got {size!r}")
    out, data = Path(out), Path(data)
    profile = PROFILES[size]
    if not is_current_build(data):
        logger.info("building FashionDet (%s) in %s", size, data)
        build_fashiondet(data, size=size, seed=seed, progress=progress, overwrite=True)
    weak, det = data / "weak", data / "det"
    common = [f"train.progress={str(progress).lower()}"]

    pretrain_dir = out / "pretrain" / "predet"
    logger.info("step 1/3: PreDet pre-training on %s", weak / "labels.jsonl")
    pretrain(load_pretrain_config(PRETRAIN_CONFIG, [
        f"data.train={weak / 'labels.jsonl'}", f"data.vocab={weak / 'vocab.json'}",
        f"data.val={weak / 'heldout_clean.jsonl'}", f"train.run_dir={pretrain_dir}", f"train.seed={seed}",
        "train.resume=true", *common, *profile["pretrain"],
    ]))

    seeds = profile["seeds"]
    data_overrides = [f"data.train={det / 'annotations' / 'train.json'}", f"data.val={det / 'annotations' / 'val.json'}",
                      f"data.train_images={det / 'images'}", f"data.val_images={det / 'images'}"]
    runs, summaries = {}, {}
    for step, (name, init) in enumerate((("predet", pretrain_dir / "checkpoints" / "model_final.pth"),
                                         ("scratch", "scratch")), start=2):
        run_dir = out / "finetune" / name
        jobs = min(seeds, os.cpu_count() or 1)
        logger.info("step %d/3: fine-tuning Mask R-CNN from %s, %d seeds, %d at a time (logs: %s/base/seed*/log.txt)",
                    step, init, seeds, jobs, run_dir)
        # one process per seed, the cores shared out between them: two one-thread runs on two
        # cores finish sooner than two two-thread runs one after the other
        summaries[name] = sweep(FINETUNE_CONFIG, {}, seeds=seeds, out_dir=run_dir, jobs=jobs,
                                overrides=[f"init={init}", *data_overrides, "train.progress=false",
                                           *profile["finetune"]],
                                echo=lambda line, name=name: logger.info("%s: %s", name, line))
        failed = [r for r in summaries[name]["runs"] if r["status"] != "done"]
        if failed:
            raise RuntimeError(f"demo fine-tuning from {init} failed: see {failed[0]['run_dir']}/log.txt\n"
                               f"{failed[0].get('error', '')}")
        runs[name] = run_dir

    paths = write_report([runs["predet"], runs["scratch"]], out / "report", split="val",
                         labels={str(runs["predet"]): "PreDet", str(runs["scratch"]): "scratch"})
    payoff = payoff_lines(summaries["predet"], summaries["scratch"])
    (out / "report" / "payoff.txt").write_text(payoff + "\n")
    return DemoResult(paths["text"], Path(paths["plots"][0]), out / "report", runs, payoff)


def payoff_lines(predet: dict, scratch: dict) -> str:
    """PreDet against scratch on val, box and mask AP: each arm's mean ± sample std over its
    seeds (the spread of one run), the gap of the means ± its standard error (the noise of the
    gap itself, which more seeds shrink), and whether the gap is beyond two of those
    (``predet.tools.stats.mean_gap``)."""
    from predet.tools.stats import mean_gap

    def stats(summary: dict, metric: str) -> dict | None:
        settings = summary.get("settings") or [{}]
        entry = (settings[0].get("val") or {}).get(metric)
        return {"mean": 100 * entry["mean"], "std": None if entry["std"] is None else 100 * entry["std"],
                "n": entry["n"]} if entry and entry.get("mean") is not None else None

    def cell(entry: dict | None) -> str:
        if entry is None:
            return "n/a"
        return f"{entry['mean']:.1f}" + ("" if entry["std"] is None else f" ± {entry['std']:.1f}")

    seeds = len(predet.get("runs") or [])
    lines = [f"PreDet vs scratch on val over {seeds} fine-tuning seeds each (mean ± sample std of a run; "
             "the gap ± its standard error):"]
    for label, metric in (("box AP ", "bbox/AP"), ("mask AP", "segm/AP")):
        a, b = stats(predet, metric), stats(scratch, metric)
        gap = mean_gap(a, b)
        verdict = ("n/a" if gap is None else
                   f"gap {gap['gap']:+.1f} ± {gap['se']:.1f}: "
                   + ("PreDet wins beyond 2 standard errors" if gap["wins_by_2se"] else "inside 2 standard errors"))
        lines.append(f"  {label}  PreDet {cell(a)}   scratch {cell(b)}   {verdict}")
    return "\n".join(lines)
