"""Does the easiest rung learn? Clean-tag classification of FashionDet weak canvases in a
hand-written loop, outside predet's trainer and data pipeline.

It is the control for ``predet pretrain`` with ``data.train=weak/clean_labels.jsonl
loss.lambda_rpn=0 loss.lambda_roi=0``: same canvases, crops, optimiser and loss form, one view
per image, held-out mAP over the vocabulary beside the constant predictor's. If this learns and
the trainer does not, the trainer is at fault; if neither does, the regime is.

    python benchmarks/classification_probe.py --data data/fashiondet/weak --model resnet18 \\
        --size 64 --batch 32 --lr 0.02 --iters 300 [--threads 1]

Prints one JSON line per evaluation.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import nn
from torchvision.ops import roi_align

from predet.evaluation.pretext import constant_predictor_map, mean_average_precision
from predet.modeling.predet.meta_arch import IMAGENET_MEAN, IMAGENET_STD
from predet.modeling.predet.weak_head import weak_label_loss


def load_canvases(weak: Path, labels_file: str, vocab: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """All canvases of a labels file as uint8 (N, 3, H, W) and their multi-hot tags."""
    records = [json.loads(line) for line in (weak / labels_file).read_text().splitlines()]
    images = torch.stack([torch.from_numpy(np.array(Image.open(weak / r["image"]).convert("RGB"))).permute(2, 0, 1)
                          for r in records])
    tags = torch.zeros(len(records), len(vocab))
    for i, r in enumerate(records):
        tags[i, [vocab.index(n) for n in r["labels"]]] = 1
    return images, tags


def random_resized_crops(images: torch.Tensor, size: int, scale, gen: torch.Generator) -> torch.Tensor:
    """RandomResizedCrop (aspect 3/4-4/3) + horizontal flip for a whole batch in one RoIAlign."""
    n, _, h, w = images.shape
    area = torch.empty(n).uniform_(*scale, generator=gen) * h * w
    aspect = torch.exp(torch.empty(n).uniform_(math.log(3 / 4), math.log(4 / 3), generator=gen))
    cw, ch = (area * aspect).sqrt().clamp(max=w), (area / aspect).sqrt().clamp(max=h)
    x0, y0 = torch.rand(n, generator=gen) * (w - cw), torch.rand(n, generator=gen) * (h - ch)
    boxes = torch.stack([torch.arange(n, dtype=torch.float), x0, y0, x0 + cw, y0 + ch], 1)
    out = roi_align(images.float() / 255, boxes, size, 1.0, 2, aligned=True)
    flip = torch.rand(n, generator=gen) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def small_cnn(num_classes: int) -> nn.Module:
    """Four conv-BN-ReLU-pool blocks: a model with no depth to make optimisation hard."""
    layers, width = [], 3
    for out in (32, 64, 128, 256):
        layers += [nn.Conv2d(width, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(), nn.MaxPool2d(2)]
        width = out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/fashiondet/weak")
    parser.add_argument("--labels", default="clean_labels.jsonl", help="training tags (labels.jsonl: noisy)")
    parser.add_argument("--model", default="resnet18", help="a torchvision classifier name, or small_cnn")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--scale", type=float, nargs=2, default=[0.3, 1.0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--eval-period", type=int, default=50)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    weak = Path(args.data)
    vocab = json.loads((weak / "vocab.json").read_text())
    images, tags = load_canvases(weak, args.labels, vocab)
    heldout, heldout_tags = load_canvases(weak, "heldout_clean.jsonl", vocab)
    heldout = F.interpolate(heldout.float() / 255, size=args.size, mode="bilinear", antialias=True)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    model = small_cnn(len(vocab)) if args.model == "small_cnn" else getattr(torchvision.models, args.model)(
        num_classes=len(vocab))
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": 1e-4}, {"params": no_decay, "weight_decay": 0.0}],
                          lr=args.lr, momentum=0.9)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * i / args.iters)))
    gen = torch.Generator().manual_seed(args.seed)

    @torch.no_grad()
    def heldout_map() -> float:
        model.eval()
        scores = torch.cat([model((heldout[i:i + 100] - mean) / std) for i in range(0, len(heldout), 100)])
        model.train()
        return mean_average_precision(scores, heldout_tags)

    start, running = time.perf_counter(), None
    for it in range(1, args.iters + 1):
        idx = torch.randint(len(images), (args.batch,), generator=gen)
        x = (random_resized_crops(images[idx], args.size, args.scale, gen) - mean) / std
        loss = weak_label_loss(model(x), tags[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
        running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
        if it % args.eval_period == 0 or it == args.iters:
            print(json.dumps({"iteration": it, "train_loss": round(running, 4), "heldout_mAP": round(heldout_map(), 4),
                              "constant_mAP": round(constant_predictor_map(heldout_tags), 4),
                              "images_per_s": round(it * args.batch / (time.perf_counter() - start), 1),
                              "model": args.model, "lr": args.lr, "batch": args.batch, "size": args.size}),
                  flush=True)


if __name__ == "__main__":
    main()
