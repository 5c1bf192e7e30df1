"""What one paper-scale PreDet pre-training step costs against a Mask R-CNN training step.

Both on the same source images (1333 x 800 photographs with 7 boxes each): PreDet R50-FPN as
``pretrain/r50_fpn_gpu`` builds it, on two 800 px views of each image; torchvision's Mask R-CNN
R50-FPN (every layer trained, as PreDet trains every layer) on the image itself (resized to
800 x 1333 by its transform).

* FLOPs (``torch.utils.flop_counter``): forward + backward of one step, and the forward split
  by part (the counter attributes backward ops to the wrong modules, so the split is of the
  forward; backward is about twice it for every trained conv/linear). Goal: PreDet / Mask R-CNN
  <= 1.3.
* Peak memory per image on the CPU, float32: the rise of the process's peak RSS over one
  training step (activations, gradients, momentum, workspaces), at 1 and at 2 images, each in a
  fresh process; per image = the difference, fixed = the rest. Under bf16 autocast on a GPU the
  activations are smaller: these are the upper estimate a user sizes GPUs by.

Prints one JSON object; ``benchmarks/results/step_cost.json`` is its committed output.
Usage: ``python benchmarks/step_cost.py [--skip-memory]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np
import skimage.data
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode
from torchvision.ops import MultiScaleRoIAlign

from predet.data.views import TwoViewTransform
from predet.modeling.predet.meta_arch import PreDet
from predet.pretrain import load_pretrain_config

NUM_TAGS = 1000
PHOTOS = ("astronaut", "coffee")


def photo(i: int, width: int = 1333, height: int = 800) -> Image.Image:
    return Image.fromarray(getattr(skimage.data, PHOTOS[i % len(PHOTOS)])()).convert("RGB").resize(
        (width, height), Image.BICUBIC)


def predet_inputs(n: int):
    cfg = load_pretrain_config("pretrain/r50_fpn_gpu", ["model.norm=bn"])  # SyncBN needs a process group
    torch.manual_seed(0)
    model = PreDet(NUM_TAGS, cfg.model, cfg.loss)
    # torchvision's RoIAlign kernel, as on a GPU: the CPU's sparse-matrix pooling is counted by the
    # FLOP counter as the dense product it stands for
    model.roi_align.__class__ = MultiScaleRoIAlign
    transform = TwoViewTransform(cfg.data.views)
    samples = [transform(photo(i), i) for i in range(n)]
    batch = {k: torch.stack([s[k] for s in samples]) for k in ("view1", "view2", "colour1", "colour2", "b1", "b2")}
    labels = torch.zeros(n, NUM_TAGS)
    labels[:, :3] = 1
    batch["labels"] = labels
    return model, lambda m: m(batch)


def maskrcnn_inputs(n: int):
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    torch.manual_seed(0)
    model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=81, trainable_backbone_layers=5)
    rng = np.random.default_rng(0)
    images, targets = [], []
    for i in range(n):
        images.append(torch.from_numpy(np.array(photo(i))).permute(2, 0, 1).float() / 255)
        xy = rng.uniform(0, [1100, 600], (7, 2))
        wh = rng.uniform(40, 230, (7, 2))
        boxes = torch.tensor(np.concatenate([xy, xy + wh], 1), dtype=torch.float32)
        masks = torch.zeros(7, 800, 1333, dtype=torch.uint8)
        for k, (x1, y1, x2, y2) in enumerate(boxes.round().int().tolist()):
            masks[k, y1:y2, x1:x2] = 1
        targets.append({"boxes": boxes, "labels": torch.randint(1, 81, (7,)), "masks": masks})
    return model, lambda m: m(images, targets)


BUILD = {"predet": predet_inputs, "mask_rcnn": maskrcnn_inputs}
PARTS = {
    "predet": ["backbone.body", "backbone.fpn", "cls_head", "crpn", "box_head", "roi_align", "roi_head"],
    "mask_rcnn": ["backbone.body", "backbone.fpn", "rpn", "roi_heads.box_roi_pool", "roi_heads.box_head",
                  "roi_heads.box_predictor", "roi_heads.mask_roi_pool", "roi_heads.mask_head",
                  "roi_heads.mask_predictor"],
}


def loss_of(out: dict) -> torch.Tensor:
    return sum(v for k, v in out.items() if k.startswith("loss"))


def _part_flops(counts: dict, name: str) -> int:
    """A module's forward FLOPs; for one whose methods are called instead of its forward (the
    CRPN), the sum of its direct submodules'."""
    if name in counts:
        return counts[name]
    return sum(v for k, v in counts.items() if k.startswith(name + ".") and "." not in k[len(name) + 1:])


def count_flops(name: str, images: int) -> dict:
    model, run = BUILD[name](images)
    model.train()
    root = type(model).__name__
    with FlopCounterMode(display=False, depth=4) as forward:
        out = run(model)
    with FlopCounterMode(display=False) as both:
        loss_of(run(model)).backward()
    counts = {k: sum(v.values()) for k, v in forward.get_flop_counts().items()}
    total_forward = counts.get(root, forward.get_total_flops())
    parts = {p: _part_flops(counts, f"{root}.{p}") for p in PARTS[name]}
    parts["rest (losses, matching, dynamic conv, sampling)"] = total_forward - sum(parts.values())
    return {"total_flops": both.get_total_flops(), "forward_flops": total_forward,
            "forward_split": {k: round(v / total_forward, 4) for k, v in parts.items()},
            "forward_gflops_by_part": {k: round(v / 1e9, 1) for k, v in parts.items()},
            "losses": sorted(k for k in out if k.startswith("loss"))}


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        line = next(l for l in f if l.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def peak_step_memory(name: str, images: int) -> dict:
    """In this (fresh) process: the peak RSS rise over one SGD training step (VmHWM, reset just
    before the step; getrusage's maximum would include the parent's before exec)."""
    model, run = BUILD[name](images)
    model.train()
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS mark to the current RSS
    before = _status_bytes("VmRSS")
    loss_of(run(model)).backward()
    opt.step()
    return {"images": images, "params": params, "rss_before_step": before,
            "peak_rise_bytes": _status_bytes("VmHWM") - before}


def measure_memory(name: str, images: int) -> dict:
    cmd = [sys.executable, __file__, "--memory-child", name, str(images)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-child", nargs=2, metavar=("MODEL", "IMAGES"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        print(json.dumps(peak_step_memory(args.memory_child[0], int(args.memory_child[1]))))
        return {}
    start = time.time()
    result = {"command": "python benchmarks/step_cost.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "torch": torch.__version__, "images": args.images, "threads": torch.get_num_threads(),
              "source_images": "1333 x 800 photographs (scikit-image), 7 boxes each",
              "predet": "pretrain/r50_fpn_gpu (BN for SyncBN), 2 views of 800 px per image, "
                        f"{NUM_TAGS} tags",
              "mask_rcnn": "torchvision maskrcnn_resnet50_fpn, 81 classes, every layer trained, 800 x 1333"}
    for name in BUILD:
        result[name] = count_flops(name, args.images)
    ratio = result["predet"]["total_flops"] / result["mask_rcnn"]["total_flops"]
    result["predet_over_mask_rcnn_flops"] = round(ratio, 3)
    result["goal_predet_over_mask_rcnn_flops"] = 1.3
    for name in BUILD:
        result[name]["total_gflops_per_image"] = round(result[name]["total_flops"] / args.images / 1e9, 1)
    if not args.skip_memory:
        for name in BUILD:
            one, two = measure_memory(name, 1), measure_memory(name, 2)
            per_image = two["peak_rise_bytes"] - one["peak_rise_bytes"]
            result[name]["peak_memory_cpu_float32"] = {
                "params": one["params"], "weights_gib": round(one["params"] * 4 / 2**30, 2),
                "step_rise_1_image_gib": round(one["peak_rise_bytes"] / 2**30, 2),
                "step_rise_2_images_gib": round(two["peak_rise_bytes"] / 2**30, 2),
                "per_image_gib": round(per_image / 2**30, 2),
                "fixed_gib": round((one["peak_rise_bytes"] - per_image) / 2**30, 2)}
    result["seconds"] = round(time.time() - start)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
