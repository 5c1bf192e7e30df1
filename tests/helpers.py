"""Small builders shared by the tests: tiny models, smooth images, two-view batches."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from predet.config.pretrain import LossConfig, ModelConfig, ViewConfig
from predet.data.views import make_two_views
from predet.modeling.predet.meta_arch import PreDet


def tiny_model_config(**kw) -> ModelConfig:
    base = dict(backbone="resnet18", fpn_channels=32, box_head_dim=64, crpn_hidden=32,
                anchor_sizes=[8, 16, 32, 64, 128], crpn_anchors_per_query=64, pre_nms_top_n=32,
                post_nms_top_n=8, rois_per_query=8, proj_dim=32)
    base.update(kw)
    return ModelConfig(**base)


def tiny_model(num_classes=5, loss: LossConfig | None = None, **kw) -> PreDet:
    return PreDet(num_classes, tiny_model_config(**kw), loss or LossConfig())


def smooth_image(seed: int, width=200, height=150) -> Image.Image:
    """A low-frequency RGB image: resampling it twice gives nearly the same pixels."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray((rng.uniform(0, 255, (6, 8, 3))).astype(np.uint8))
    return small.resize((width, height), Image.BICUBIC)


def two_view_batch(n=2, size=64, q=4, seed=0, num_classes=5) -> dict:
    cfg = ViewConfig(size=size, num_queries=q, min_query_px=6)
    samples = [make_two_views(smooth_image(seed + i), seed + i, cfg) for i in range(n)]
    batch = {k: torch.stack([s[k] for s in samples]) for k in ("view1", "view2", "colour1", "colour2", "b1", "b2")}
    labels = torch.zeros(n, num_classes)
    labels[torch.arange(n), torch.arange(n) % num_classes] = 1
    batch["labels"] = labels
    batch["num_images"] = n
    return batch


CONFIGS = Path(str(importlib.resources.files("predet") / "configs"))
CPU_PRETRAIN_CONFIG = CONFIGS / "pretrain" / "fashiondet_r18_cpu.yaml"
CPU_FINETUNE_CONFIG = CONFIGS / "finetune" / "fashiondet_r18_cpu.yaml"


def tiny_pretrain_overrides(weak: Path, run_dir: Path, iters: int, **extra) -> list[str]:
    """The shipped CPU config, shrunk: the same code path on a 64 px, 4-image problem."""
    items = {
        "data.train": weak / "labels.jsonl", "data.vocab": weak / "vocab.json", "data.val": "",
        "train.eval_period": 0, "data.views.size": 64, "data.views.num_queries": 4, "data.views.min_query_px": 6,
        "model.fpn_channels": 32, "model.box_head_dim": 64, "model.crpn_hidden": 32,
        "model.anchor_sizes": "[8,16,32,64,128]", "model.crpn_anchors_per_query": 64,
        "model.pre_nms_top_n": 32, "model.post_nms_top_n": 8, "model.rois_per_query": 4,
        "solver.max_iters": iters, "solver.warmup_iters": 5, "solver.lr": 0.01,
        "train.batch_size": 4, "train.num_workers": 0, "train.checkpoint_period": 10,
        "train.log_period": 1, "train.progress": "false", "train.run_dir": run_dir,
    }
    items.update(extra)
    return [f"{k}={v}" for k, v in items.items()]


def tiny_pretrain_config(weak, run_dir, iters, **extra):
    from predet.pretrain import load_pretrain_config

    return load_pretrain_config(CPU_PRETRAIN_CONFIG, tiny_pretrain_overrides(weak, run_dir, iters, **extra))


# The tiny fine-tuning's detector: heads sized like the tiny pre-training's, so they transfer.
TINY_DETECTOR = {
    "model.min_size": 96, "model.max_size": 96, "model.fpn_channels": 32, "model.box_head_dim": 64,
    "model.mask_head_dim": 16, "model.anchor_sizes": "[8,16,32,64,128]",
    "model.rpn_pre_nms_top_n_train": 100, "model.rpn_post_nms_top_n_train": 50,
    "model.rpn_pre_nms_top_n_test": 100, "model.rpn_post_nms_top_n_test": 50,
    "model.box_batch_size_per_image": 32, "model.detections_per_image": 20,
}


def tiny_finetune_overrides(fashiondet: Path, run_dir: Path, init: str, iters: int = 6, **extra) -> list[str]:
    """The shipped CPU fine-tuning config on the tiny build, with heads matching the tiny pre-training."""
    det = fashiondet / "det"
    items = {
        "init": init, "schedule": "", "data.subset": 0,
        "data.train": det / "annotations" / "train.json", "data.train_images": det / "images",
        "data.val": det / "annotations" / "val.json", "data.val_images": det / "images",
        **TINY_DETECTOR,
        "solver.max_iters": iters, "solver.warmup_iters": 2, "solver.lr": 0.01, "solver.milestones": f"[{iters - 2}]",
        "train.batch_size": 2, "train.num_workers": 0, "train.checkpoint_period": 2, "train.log_period": 1,
        "train.eval_period": 0, "train.progress": "false", "train.run_dir": run_dir, "eval.batch_size": 4,
    }
    items.update(extra)
    return [f"{k}={v}" for k, v in items.items()]


class CrashAt:
    """A hook that kills a run at a given iteration, after the trainer saved its checkpoints."""

    def __init__(self, iteration):
        self.iteration = iteration

    def after_step(self, state):
        if state.iteration == self.iteration:
            raise KeyboardInterrupt("simulated crash")


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmarks(monkeypatch, *names: str):
    """Import benchmark scripts (not a package) by file, the later ones able to import the
    earlier; returns the last. Registered in sys.modules: dataclasses look their module up there."""
    import importlib.util
    import sys

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    for name in names:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, name, module)
        spec.loader.exec_module(module)
    return sys.modules[names[-1]]


def probe_overrides(fashiondet, **extra) -> dict:
    """The transfer probe on the tiny build: 4 iterations on 8 images every 2 pre-training iterations."""
    det = fashiondet / "det"
    items = {
        "probe.data": det / "annotations" / "train.json", "probe.images": det / "images",
        "probe.val": det / "annotations" / "val.json", "probe.val_images": det / "images",
        "probe.config": CPU_FINETUNE_CONFIG, "probe.iters": 4, "probe.subset": 8, "probe.period": 2,
        "probe.overrides": "[" + ",".join(f"'{k}={v}'" for k, v in [*TINY_DETECTOR.items(), ("train.batch_size", 2),
                                                                    ("train.num_workers", 0)]) + "]",
    }
    items.update(extra)
    return items
