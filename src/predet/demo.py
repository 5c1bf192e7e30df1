"""``predet demo`` / ``make demo``: the whole pipeline on FashionDet, on a CPU.

FashionDet data -> PreDet pre-training on the weak set -> Mask R-CNN fine-tuning on a
low-data split from that checkpoint and from scratch, at the same budget -> a table and a plot
of AP against fine-tuning iterations. Every step resumes, so an interrupted demo picks up
where it stopped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from predet.data.fashiondet import build_fashiondet, is_current_build
from predet.finetune import finetune, load_finetune_config
from predet.pretrain import load_pretrain_config, pretrain
from predet.report import write_report

logger = logging.getLogger(__name__)

PRETRAIN_CONFIG = "pretrain/fashiondet_r18_cpu"  # shipped configs, by name (predet.config.shipped_config)
FINETUNE_CONFIG = "finetune/fashiondet_r18_cpu"

# The FashionDet benchmark's 1x: 300 iterations at batch 4 (the config's CPU 1x is 450), 64
# sampled RoIs per image instead of 128, a 64-channel mask head instead of 128.
BENCHMARK_FINETUNE_CUTS = ["schedule_scale=0.000833333", "model.box_batch_size_per_image=64", "model.mask_head_dim=64"]

# "small" is the shipped CPU configs with pre-training cut to a quarter of the recipe's 800
# iterations and fine-tuning cut like the benchmark's 1x (with the config's 450-iteration 1x the
# demo was on course for about 40 minutes on 2 cores; with these cuts it takes 20); "tiny" shrinks
# everything to a smoke test.
PROFILES = {
    "small": {"pretrain": ["solver.max_iters=200"], "finetune": BENCHMARK_FINETUNE_CUTS},
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
    },
}


@dataclass
class DemoResult:
    table: str
    plot: Path
    report_dir: Path
    runs: dict[str, Path]


def run_demo(out: str | Path = "runs/demo", data: str | Path = "data/fashiondet", size: str = "small",
             seed: int = 0, progress: bool = True) -> DemoResult:
    """Run (or resume) the demo; returns the printed table and the plot's path."""
    if size not in PROFILES:
        raise ValueError(f"demo size must be one of {sorted(PROFILES)}, got {size!r}")
    out, data = Path(out), Path(data)
    profile = PROFILES[size]
    if not is_current_build(data):
        logger.info("building FashionDet (%s) in %s", size, data)
        build_fashiondet(data, size=size, seed=seed, progress=progress, overwrite=True)
    weak, det = data / "weak", data / "det"
    common = [f"train.seed={seed}", f"train.progress={str(progress).lower()}", "train.resume=true"]

    pretrain_dir = out / "pretrain" / "predet"
    logger.info("step 1/3: PreDet pre-training on %s", weak / "labels.jsonl")
    pretrain(load_pretrain_config(PRETRAIN_CONFIG, [
        f"data.train={weak / 'labels.jsonl'}", f"data.vocab={weak / 'vocab.json'}",
        f"data.val={weak / 'heldout_clean.jsonl'}", f"train.run_dir={pretrain_dir}", *common, *profile["pretrain"],
    ]))

    runs = {}
    for step, (name, init) in enumerate((("predet", pretrain_dir / "checkpoints" / "model_final.pth"),
                                         ("scratch", "scratch")), start=2):
        run_dir = out / "finetune" / name
        logger.info("step %d/3: fine-tuning Mask R-CNN from %s", step, init)
        finetune(load_finetune_config(FINETUNE_CONFIG, [
            f"init={init}", f"data.train={det / 'annotations' / 'train.json'}",
            f"data.val={det / 'annotations' / 'val.json'}", f"data.train_images={det / 'images'}",
            f"data.val_images={det / 'images'}", f"train.run_dir={run_dir}", *common, *profile["finetune"],
        ]))
        runs[name] = run_dir

    paths = write_report([runs["predet"], runs["scratch"]], out / "report", split="val",
                         labels={str(runs["predet"]): "PreDet", str(runs["scratch"]): "scratch"})
    return DemoResult(paths["text"], Path(paths["plots"][0]), out / "report", runs)
