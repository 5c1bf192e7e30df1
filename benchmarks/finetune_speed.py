"""Fine-tuning speed: our step against a plain torchvision training loop, and eval speed.

The baseline is torchvision's references/detection loop training torchvision's detector: the
shipped CPU fine-tuning config's model with torchvision's own RoIAlign modules and box head.
Ours is predet's trainer on predet's detector: the same weights and numbers, pooled by
predet's CPU RoIAlign (modeling/poolers.py). Same batch, same process, runs alternated, so
machine noise cancels out. ``trainer_overhead`` is predet's trainer against the plain loop on
predet's own detector: what logging, metrics and checks cost.
Prints one JSON object. Usage: python benchmarks/finetune_speed.py [--quick] [--device cuda]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from predet.config import TrainConfig
from predet.data.coco import build_detection_dataset, collate_detection
from predet.data.fashiondet import build_fashiondet
from predet.engine.optim import build_optimizer
from predet.engine.trainer import train
from predet.evaluation.coco import evaluate_dataset
from predet.finetune import load_finetune_config, resolve_solver
from predet.modeling.detectors import build_detector, with_torchvision_poolers

CONFIG = "finetune/fashiondet_r18_cpu"


class StepClock:
    """Wall time from the end of the warm-up steps to the last step."""

    def __init__(self, warmup: int):
        self.warmup, self.start, self.end = warmup, None, None

    def after_step(self, state):
        if state.device.type == "cuda":
            torch.cuda.synchronize()
        if state.iteration == self.warmup:
            self.start = time.perf_counter()
        self.end = time.perf_counter()


def plain_torchvision_loop(model, batch, solver, steps: int, warmup: int, device) -> float:
    """The loop of torchvision's references/detection: to device, forward, sum, backward, step."""
    optimizer = build_optimizer(model, solver)
    model.train()
    for i in range(steps):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        images = [im.to(device, non_blocking=True) for im in batch["images"]]
        targets = [{k: v.to(device, non_blocking=True) for k, v in t.items() if torch.is_tensor(v)}
                   for t in batch["targets"]]
        loss_dict = model(images, targets)
        loss = sum(loss_dict.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / (steps - warmup)


def our_trainer(model, batch, solver, steps: int, warmup: int, device, run_dir: Path) -> float:
    clock = StepClock(warmup)
    cfg = TrainConfig(run_dir=str(run_dir), device=device.type, batch_size=len(batch["images"]),
                      checkpoint_period=10**9, log_period=20, progress=False)

    def make_loader(start):
        while True:
            yield batch

    train(model, make_loader, solver, cfg, hooks=[clock])
    return (clock.end - clock.start) / (steps - warmup)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer steps; under a minute on 2 cores")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    steps, warmup = (8, 2) if args.quick else (30, 5)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build_fashiondet(tmp / "data", size="tiny", seed=0, canvas=160, progress=False)
        det = tmp / "data" / "det"
        cfg = load_finetune_config(CONFIG, ["init=scratch", "schedule=", f"solver.max_iters={steps}",
                                            "solver.warmup_iters=0", "solver.clip_grad_norm=0",
                                            "solver.lr=0.002"])  # no warm-up: a small lr keeps both loops finite
        train_set = build_detection_dataset(str(det / "annotations" / "train.json"), str(det / "images"), train=True)
        batch = collate_detection([train_set[(i, i)] for i in range(cfg.train.batch_size)])
        torch.manual_seed(0)
        model = build_detector(cfg.model, len(train_set.cat_ids)).to(device)
        solver = resolve_solver(cfg)
        reference = with_torchvision_poolers(copy.deepcopy(model))
        # Same weights everywhere; order alternated to cancel drift in machine speed.
        plain_1 = plain_torchvision_loop(copy.deepcopy(reference), batch, solver, steps, warmup, device)
        ours_1 = our_trainer(copy.deepcopy(model), batch, solver, steps, warmup, device, tmp / "a")
        loop_1 = plain_torchvision_loop(copy.deepcopy(model), batch, solver, steps, warmup, device)
        loop_2 = plain_torchvision_loop(copy.deepcopy(model), batch, solver, steps, warmup, device)
        ours_2 = our_trainer(copy.deepcopy(model), batch, solver, steps, warmup, device, tmp / "b")
        plain_2 = plain_torchvision_loop(copy.deepcopy(reference), batch, solver, steps, warmup, device)
        val_set = build_detection_dataset(str(det / "annotations" / "val.json"), str(det / "images"))
        metrics = evaluate_dataset(model, val_set, device, batch_size=cfg.eval.batch_size, progress=False)
    ours, plain, loop = (ours_1 + ours_2) / 2, (plain_1 + plain_2) / 2, (loop_1 + loop_2) / 2
    result = {
        "device": str(device), "torch": torch.__version__, "machine": platform.machine(),
        "threads": torch.get_num_threads(), "quick": args.quick, "config": CONFIG,
        "images_per_step": cfg.train.batch_size, "image_size": cfg.model.min_size, "timed_steps": steps - warmup,
        "finetune_step_over_torchvision_loop": round(ours / plain, 3),  # goal <= 0.77
        "trainer_overhead": round(ours / loop, 3),  # predet's trainer vs the plain loop, predet's detector
        "step_seconds": {"ours": round(ours, 4), "torchvision_loop": round(plain, 4),
                         "plain_loop_predet_detector": round(loop, 4),
                         "ours_runs": [round(ours_1, 4), round(ours_2, 4)],
                         "torchvision_runs": [round(plain_1, 4), round(plain_2, 4)],
                         "plain_loop_predet_detector_runs": [round(loop_1, 4), round(loop_2, 4)]},
        "eval_images_per_s": round(metrics["images_per_s"], 2),
        "eval_images": len(val_set),
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
