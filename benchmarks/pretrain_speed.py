"""Pre-training speed: batched CRPN vs a per-query loop, a PreDet step vs a Faster R-CNN step,
a PreDet step vs its floor (backbone + FPN forward and backward of the same two views; the
goal is <= 1.5: the pretext heads should cost at most half the network they train), and the
step with predet's sparse-matrix RoIAlign vs torchvision's.

Both figures are ratios measured in the same process, so machine noise cancels out.
Prints one JSON object. Usage: python benchmarks/pretrain_speed.py [--quick] [--device cuda]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import torch
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import MultiScaleRoIAlign

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import two_view_batch  # noqa: E402

from predet.config.pretrain import ModelConfig
from predet.data.views import colour_views  # noqa: E402
from predet.modeling.predet.crpn import QueryConditionedRPN, per_query_conv_loop  # noqa: E402
from predet.modeling.predet.meta_arch import PreDet, crpn_target_sampler  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def best_time(fn, reps: int, device) -> float:
    """Best of ``reps`` timed calls after one warm-up: the least noisy estimate of cost."""
    fn()
    times = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def best_times_interleaved(fns: list, reps: int, device) -> list[float]:
    """Best of ``reps`` timed calls of each function, taken in turn (a, b, c, a, b, c, ...):
    on a noisy machine a slow spell then slows every function alike, where timing one after
    the other let it land on one of them (a step's best time moved by 10 % between runs)."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(reps):
        for fn, spent in zip(fns, times):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            spent.append(time.perf_counter() - start)
    return [min(spent) for spent in times]


def crpn_speedup(q: int, n: int, size: int, channels: int, reps: int, device) -> dict:
    """The query-conditioned 1x1 convs, forward + backward: one batched op vs a loop per query.

    The trunk and the weight generators are the same work in both paths and are left out.
    """
    torch.manual_seed(0)
    a = 3
    shapes = [size // s for s in (4, 8, 16, 32)] + [size // 64]
    trunks = [torch.randn(n, channels, s, s, device=device, requires_grad=True) for s in shapes]
    weights = [torch.randn(n, q, a, channels, device=device, requires_grad=True),
               torch.randn(n, q, a, device=device, requires_grad=True),
               torch.randn(n, q, 4 * a, channels, device=device, requires_grad=True),
               torch.randn(n, q, 4 * a, device=device, requires_grad=True)]
    crpn = QueryConditionedRPN(channels, 8, num_anchors=a, hidden=8).to(device)

    def batched():
        flat = torch.cat([t.flatten(2) for t in trunks], dim=2)
        scores = crpn.scores(flat, weights[0], weights[1])
        deltas = crpn.dense_deltas(flat, weights[2], weights[3])
        (scores.sum() + deltas.sum()).backward()

    def loop():
        scores, deltas = per_query_conv_loop(trunks, *weights)
        (scores.sum() + deltas.sum()).backward()

    t_batched, t_loop = best_time(batched, reps, device), best_time(loop, max(1, reps // 2), device)
    return {"batched_s": t_batched, "loop_s": t_loop, "speedup": t_loop / t_batched}


def fasterrcnn_like(model_cfg: ModelConfig, predet: PreDet, size: int) -> FasterRCNN:
    """torchvision Faster R-CNN on the same backbone, anchors, box head and image size."""
    return FasterRCNN(
        predet.backbone, num_classes=None, min_size=size, max_size=size,
        rpn_anchor_generator=predet.anchor_generator,
        box_head=TwoMLPHead(model_cfg.fpn_channels * 49, model_cfg.box_head_dim),
        box_predictor=FastRCNNPredictor(model_cfg.box_head_dim, 11),
    )


def step_ratio(model_cfg: ModelConfig, n: int, size: int, q: int, reps: int, device) -> dict:
    torch.manual_seed(0)
    batch = two_view_batch(n=n, size=size, q=q, num_classes=10)
    if device.type == "cpu":  # as a CPU run's loader sends them: colour changes applied and the
        # CRPN's anchor sample drawn in its workers (predet.pretrain.build_pretrain_loader)
        for view, colour in (("view1", "colour1"), ("view2", "colour2")):
            batch[view] = colour_views(batch[view], batch.pop(colour))
        batch["crpn_pos"], batch["crpn_neg"] = crpn_target_sampler(model_cfg, size)(batch["b2"], range(n))
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    predet = PreDet(10, model_cfg).to(device)
    frcnn = fasterrcnn_like(model_cfg, PreDet(10, model_cfg), size).to(device)
    images = list(torch.cat([batch["view1"], batch["view2"]]).float() / 255)  # torchvision takes floats
    boxes = torch.cat([batch["b1"], batch["b2"]])
    targets = [{"boxes": b, "labels": torch.randint(1, 11, (len(b),), device=device)} for b in boxes]

    def train_step(model, loss_fn):
        opt = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)

        def step():
            losses = loss_fn(model)
            opt.zero_grad()
            sum(v for k, v in losses.items() if k.startswith("loss")).backward()
            opt.step()

        return step

    def floor_losses(m):
        c5, fpn = m.features(batch["view1"], batch["view2"])  # the same views, per-view BN as set
        return {"loss": c5.mean() + sum(f.mean() for f in fpn.values())}

    with_tv = PreDet(10, model_cfg).to(device)  # the same step with torchvision's own RoIAlign
    with_tv.roi_align = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2, canonical_scale=model_cfg.roi_canonical_scale)
    # the same step with the heads multiplying in float32 (model.head_dtype's other value)
    other_dtype = "float32" if model_cfg.head_dtype == "bfloat16" else "bfloat16"
    other = PreDet(10, dataclasses.replace(model_cfg, head_dtype=other_dtype)).to(device)
    t_predet, t_floor, t_tv, t_other = best_times_interleaved(
        [train_step(predet, lambda m: m(batch)), train_step(PreDet(10, model_cfg).to(device), floor_losses),
         train_step(with_tv, lambda m: m(batch)), train_step(other, lambda m: m(batch))], reps, device)
    t_frcnn = best_time(train_step(frcnn, lambda m: m(images, targets)), reps, device)
    return {"predet_step_s": t_predet, "fasterrcnn_step_s": t_frcnn, "backbone_fpn_step_s": t_floor,
            "predet_step_torchvision_roi_align_s": t_tv, f"predet_step_{other_dtype}_heads_s": t_other,
            "ratio": t_predet / t_frcnn, "floor_ratio": t_predet / t_floor, "roi_align_ratio": t_tv / t_predet,
            "other_heads_floor_ratio": t_other / t_floor}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, finishes in under a minute on 2 cores")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--config", default="pretrain/fashiondet_r18_cpu",
                        help="pre-training config whose model and view size are benchmarked")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    from predet.pretrain import load_pretrain_config

    cfg = load_pretrain_config(args.config)
    size, q = cfg.data.views.size, cfg.data.views.num_queries
    n = 2 if args.quick else cfg.train.batch_size
    reps = 3 if args.quick else 7
    result = {
        "device": str(device),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "config": args.config,
        "quick": args.quick,
        "images_per_step": n,
        "view_size": size,
    }
    for nq in (16, 64):
        crpn = crpn_speedup(nq, n, size, cfg.model.fpn_channels, reps, device)
        result[f"crpn_batched_vs_loop_speedup_q{nq}"] = round(crpn["speedup"], 2)
        result[f"crpn_q{nq}_seconds"] = {k: round(v, 5) for k, v in crpn.items() if k != "speedup"}
    result["crpn_batched_vs_loop_speedup"] = result["crpn_batched_vs_loop_speedup_q16"]
    step = step_ratio(cfg.model, n, size, q, reps, device)
    result["predet_step_over_fasterrcnn_step"] = round(step["ratio"], 3)
    result["predet_step_over_backbone_fpn_step"] = round(step["floor_ratio"], 3)
    # > 1: the sparse-matrix RoIAlign (predet.modeling.poolers) makes the whole step that much faster
    result["step_speedup_sparse_roi_align"] = round(step["roi_align_ratio"], 3)
    result["head_dtype"] = cfg.model.head_dtype
    other = "float32" if cfg.model.head_dtype == "bfloat16" else "bfloat16"
    result[f"predet_step_{other}_heads_over_backbone_fpn_step"] = round(step["other_heads_floor_ratio"], 3)
    result["step_seconds"] = {k: round(v, 4) for k, v in step.items() if not k.endswith("ratio")}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
