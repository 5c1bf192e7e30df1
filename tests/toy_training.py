"""A toy training problem for the loop's tests (engine, faults): a conv + BN + dropout net on
random batches that depend only on the iteration, so resumed and uninterrupted runs compare
bit for bit."""

import itertools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from predet.config import SolverConfig, TrainConfig


class ToyNet(nn.Module):
    """Conv + BN + dropout: exercises buffers, momentum and RNG in the resume test."""

    def __init__(self, norm: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.BatchNorm2d(8) if norm else nn.Identity()
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(8, 4)
        self.calls = 0

    def forward(self, batch):
        self.calls += 1
        x = F.relu(self.norm(self.conv(batch["images"])))
        logits = self.fc(self.drop(x.mean((2, 3))))
        labels = batch["labels"]
        return {
            "loss_cls": F.cross_entropy(logits, labels),
            "loss_reg": 0.01 * logits.pow(2).mean(),
            "acc": (logits.argmax(1) == labels).float().mean(),
        }


def make_batch(i: int, rank: int = 0) -> dict:
    g = torch.Generator().manual_seed(10_000 * rank + i)
    return {"images": torch.randn(4, 3, 8, 8, generator=g),
            "labels": torch.randint(0, 4, (4,), generator=g), "num_images": 4}


def make_loader(start: int):
    return (make_batch(i) for i in itertools.count(start))


def new_model(norm: bool = True) -> ToyNet:
    torch.manual_seed(0)
    return ToyNet(norm)


def solver_cfg(**kw) -> SolverConfig:
    base = dict(lr=0.05, max_iters=30, warmup_iters=5, milestones=[15, 25], gamma=0.5)
    base.update(kw)
    return SolverConfig(**base)


def train_cfg(tmp_path: Path, name: str = "run", **kw) -> TrainConfig:
    base = dict(run_dir=str(tmp_path / name), device="cpu", checkpoint_period=10, log_period=5,
                progress=False, seed=3)
    base.update(kw)
    return TrainConfig(**base)


