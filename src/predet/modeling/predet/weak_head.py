"""Weak-label classification head (method.md §2.4).

Softmax cross-entropy against the multi-hot target normalised to sum 1 is the hashtag recipe
of Mahajan et al. (2018): it tolerates missing tags better than BCE. BCE is an option.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class WeakLabelHead(nn.Module):
    """Global average pool -> (optional BN without affine) -> linear.

    Pooled ReLU features share a large positive common part, through which SGD moves every
    logit at once; on small batches the logits then chase each batch's label frequencies and
    the loss climbs above the constant predictor's. ``norm=True`` removes that common part.
    """

    def __init__(self, in_channels: int, num_classes: int, norm: bool = False):
        super().__init__()
        self.norm = nn.BatchNorm1d(in_channels, affine=False) if norm else nn.Identity()
        self.fc = nn.Linear(in_channels, num_classes)
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, c5: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(c5.mean(dim=(2, 3))))


def weak_label_loss(logits: torch.Tensor, targets: torch.Tensor, kind: str = "softmax") -> torch.Tensor:
    """Loss against multi-hot ``targets``; images left with no tag carry no softmax loss.
    Computed in float32 whatever autocast made of the logits."""
    logits = logits.float()
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits, targets)
    if kind != "softmax":
        raise ValueError(f"unknown weak-label loss {kind!r}; use 'softmax' or 'bce'")
    count = targets.sum(1)
    tagged = count > 0
    if not tagged.any():
        return logits.sum() * 0.0
    dist = targets[tagged] / count[tagged, None]
    return -(dist * F.log_softmax(logits[tagged], dim=1)).sum(1).mean()
