"""Contrastive RoI head (method.md §2.7): which RoI of view 2 is the query of view 1?

RoIs come from the CRPN's proposals for each query plus ``b2[q]`` itself. Every query is
scored against every RoI of the batch in one similarity matrix; the RoIs of the same image
overlapping ``b2[q]`` (IoU >= 0.5) are its positives, everything else its negatives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_iou

from predet.modeling.precision import Float32BoxCoder, Float32Linear, autocast_off, wide
from predet.modeling.predet.crpn import pairwise_iou, sample_by_rank


@torch.no_grad()
def sample_query_rois(proposals, valid, targets, per_query=16, pos_fraction=0.5, pos_iou=0.5):
    """S RoIs per query from its proposals + its own target box (always kept).

    Returns RoI boxes (R, 4) and the image index of each RoI (R,).
    """
    n, q, k, _ = proposals.shape
    cands = torch.cat([proposals, targets[:, :, None]], dim=2).view(n * q, k + 1, 4)
    ok = torch.cat([valid, valid.new_ones(n, q, 1)], dim=2).view(n * q, k + 1)
    iou = pairwise_iou(cands, targets.reshape(n * q, 1, 4))
    pos, neg = ok & (iou >= pos_iou), ok & (iou < pos_iou)
    pos[:, k] = False  # the target itself is added below, outside the random draw
    num_pos = pos.sum(1).clamp(max=max(int(per_query * pos_fraction) - 1, 0))
    num_neg = torch.minimum(neg.sum(1), per_query - 1 - num_pos)
    keys = torch.rand(pos.shape, device=pos.device)  # one draw: positives and negatives are disjoint
    chosen = sample_by_rank(pos, num_pos, per_query, keys) | sample_by_rank(neg, num_neg, per_query, keys)
    chosen[:, k] = True
    rows, cols = chosen.nonzero(as_tuple=True)
    return cands[rows, cols], rows // q


def multi_positive_info_nce(sim: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -mean_{p in P(row)} log softmax(sim[row])[p]; rows need >= 1 positive."""
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    pos = positive.float()
    return (-(log_prob * pos).sum(1) / pos.sum(1).clamp(min=1)).mean()


class ContrastiveRoIHead(nn.Module):
    """Projection MLP + class-agnostic box regression on top of the shared box head."""

    def __init__(self, in_features: int, proj_dim: int = 128, temperature: float = 0.2, pos_iou: float = 0.5):
        super().__init__()
        self.projection = nn.Sequential(
            nn.Linear(in_features, in_features), nn.ReLU(inplace=True), nn.Linear(in_features, proj_dim)
        )
        self.bbox_pred = Float32Linear(in_features, 4)  # box deltas: float32 under autocast
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.bbox_pred.bias)
        self.temperature = temperature
        self.pos_iou = pos_iou
        self.box_coder = Float32BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        """L2-normalised float32 embeddings (their products are the contrastive logits)."""
        return F.normalize(wide(self.projection(features)), dim=1)

    @staticmethod
    def similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Cosine similarities of two sets of embeddings, float32 under autocast."""
        with autocast_off(a):
            return wide(a) @ wide(b).T

    def forward(self, query_features, roi_features, rois, roi_image, targets):
        """query_features (N*Q, D), roi_features (R, D), rois (R, 4), roi_image (R,), targets (N, Q, 4)."""
        n, q, _ = targets.shape
        flat_targets = targets.reshape(n * q, 4)
        query_image = torch.arange(n, device=rois.device).repeat_interleave(q)
        same_image = query_image[:, None] == roi_image[None, :]
        iou = box_iou(flat_targets, rois) * same_image  # (N*Q, R)
        positive = iou >= self.pos_iou
        sim = self.similarity(self.embed(query_features), self.embed(roi_features)) / self.temperature
        loss_nce = multi_positive_info_nce(sim, positive)
        accuracy = positive.gather(1, sim.argmax(1, keepdim=True)).float().mean()

        best_iou, best_query = iou.max(dim=0)
        fg = best_iou >= self.pos_iou
        deltas = self.bbox_pred(roi_features[fg])
        target_deltas = self.box_coder.encode_single(flat_targets[best_query[fg]], rois[fg])
        loss_reg = F.smooth_l1_loss(deltas, target_deltas, beta=1 / 9, reduction="sum") / max(len(rois), 1)
        return {"loss_nce": loss_nce, "loss_roi_reg": loss_reg, "acc_nce": accuracy.detach()}
