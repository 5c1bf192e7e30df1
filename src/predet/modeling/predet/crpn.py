"""CRPN: a query-conditioned RPN (method.md §2.6, supplement §3).

The ordinary RPN trunk runs on view 2. Two small MLPs turn each query embedding into the
weights of a 1x1 conv (A outputs for scores, 4A for deltas). Applied per query that is a
1x1 group convolution; here all queries of all images are one batched matmul over the
flattened FPN positions, so there is no Python loop over queries.

Anchor order everywhere is torchvision's: levels concatenated, then position, then anchor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import box_iou, clip_boxes_to_image

from predet.config import ConfigError
from predet.modeling.precision import Float32BoxCoder, autocast_off, wide


def weight_generator(query_dim: int, hidden: int, out_features: int, init_std: float = 0.001) -> nn.Sequential:
    """FC + ReLU, then FC producing a flattened conv weight and bias."""
    mlp = nn.Sequential(nn.Linear(query_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_features))
    nn.init.normal_(mlp[2].weight, std=init_std)
    nn.init.zeros_(mlp[2].bias)
    return mlp


class QueryConditionedRPN(nn.Module):
    def __init__(self, in_channels: int, query_dim: int, num_anchors: int, hidden: int = 256, init_std: float = 0.001):
        super().__init__()
        # Same module as torchvision's RPNHead.conv, so it transfers to rpn.head.conv.
        self.trunk = RPNHead(in_channels, num_anchors).conv
        self.in_channels = in_channels
        self.num_anchors = num_anchors
        self.score_generator = weight_generator(query_dim, hidden, num_anchors * (in_channels + 1), init_std)
        self.delta_generator = weight_generator(query_dim, hidden, 4 * num_anchors * (in_channels + 1), init_std)

    def trunk_features(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Trunk on every level, flattened to (N, C, L) with L = all positions of all levels."""
        return torch.cat([self.trunk(f).flatten(2) for f in features], dim=2)

    def dynamic_weights(self, queries: torch.Tensor):
        """(N, Q, D) embeddings -> score weights (N, Q, A, C), biases (N, Q, A) and the delta ones."""
        n, q, _ = queries.shape
        a, c = self.num_anchors, self.in_channels
        score = self.score_generator(queries).view(n, q, a, c + 1)
        delta = self.delta_generator(queries).view(n, q, a * 4, c + 1)
        return score[..., :c], score[..., c], delta[..., :c], delta[..., c]

    def scores(self, trunk: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """All queries' objectness for every anchor: (N, Q, L*A) in one batched matmul, float32
        under autocast (they rank the proposals)."""
        n, q, a, c = weight.shape
        with autocast_off(trunk):
            out = torch.baddbmm(wide(bias.reshape(n, q * a, 1)), wide(weight.reshape(n, q * a, c)), wide(trunk))
        return out.view(n, q, a, -1).transpose(2, 3).reshape(n, q, -1)

    def dense_deltas(self, trunk: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """All queries' deltas for every anchor: (N, Q, L*A, 4). Used for checks and small inputs."""
        n, q, a4, c = weight.shape
        with autocast_off(trunk):
            out = torch.baddbmm(wide(bias.reshape(n, q * a4, 1)), wide(weight.reshape(n, q * a4, c)),
                                wide(trunk))
        return out.view(n, q, a4 // 4, 4, -1).permute(0, 1, 4, 2, 3).reshape(n, q, -1, 4)

    def gather_deltas(self, trunk, weight, bias, img, query, anchor) -> torch.Tensor:
        """Deltas only at chosen (image, query, anchor) triples: (S, 4).

        Training needs deltas for a few hundred anchors per query, not all of them, so the
        regression conv is evaluated only there.
        """
        a = self.num_anchors
        pos, k = anchor // a, anchor % a
        feats = trunk[img, :, pos]  # (S, C)
        w = weight.view(*weight.shape[:2], a, 4, -1)[img, query, k]  # (S, 4, C)
        b = bias.view(*bias.shape[:2], a, 4)[img, query, k]  # (S, 4)
        with autocast_off(trunk):  # box deltas: float32 under autocast
            return torch.einsum("sc,sjc->sj", wide(feats), wide(w)) + wide(b)

    def ranked_deltas(self, trunk, weight, bias, anchor) -> torch.Tensor:
        """Deltas of each (image, query)'s own anchors ``anchor`` (N, Q, K): (N, Q, K, 4).

        The same numbers as :meth:`gather_deltas` for these triples, but each query's K
        positions meet its own weights in one batched matmul (all A anchor shapes, then the
        right one picked) instead of copying a (4, C) weight per anchor."""
        n, q, k = anchor.shape
        a, c = self.num_anchors, trunk.shape[1]
        pos, shape = anchor // a, anchor % a
        # positions as rows first: gathering rows of a contiguous (N, L, C) copy is several times
        # faster than gathering strided columns of (N, C, L)
        rows = trunk.transpose(1, 2).contiguous()
        feats = rows[torch.arange(n, device=trunk.device).view(n, 1, 1), pos]  # (N, Q, K, C)
        with autocast_off(trunk):
            out = torch.matmul(wide(feats), wide(weight).transpose(2, 3))  # (N, Q, K, 4A)
            out = out.view(n, q, k, a, 4) + wide(bias).view(n, q, 1, a, 4)
        return out.gather(3, shape.view(n, q, k, 1, 1).expand(n, q, k, 1, 4)).squeeze(3)


def query_loop_reference(crpn: QueryConditionedRPN, features: list[torch.Tensor], queries: torch.Tensor):
    """The per-query 1x1 conv the batched path must equal (tests and benchmarks only)."""
    return per_query_conv_loop([crpn.trunk(f) for f in features], *crpn.dynamic_weights(queries))


def per_query_conv_loop(trunks, score_w, score_b, delta_w, delta_b):
    """One F.conv2d per (image, query, level): outputs (N, Q, L*A) and (N, Q, L*A, 4)."""
    n, q, a, c = score_w.shape
    scores, deltas = [], []
    for i in range(n):
        for j in range(q):
            s_levels, d_levels = [], []
            for t in trunks:
                s = F.conv2d(t[i : i + 1], score_w[i, j].reshape(a, c, 1, 1), score_b[i, j])
                d = F.conv2d(t[i : i + 1], delta_w[i, j].reshape(4 * a, c, 1, 1), delta_b[i, j])
                s_levels.append(s.permute(0, 2, 3, 1).reshape(-1))
                d_levels.append(d.view(a, 4, *d.shape[2:]).permute(2, 3, 0, 1).reshape(-1, 4))
            scores.append(torch.cat(s_levels))
            deltas.append(torch.cat(d_levels))
    return torch.stack(scores).view(n, q, -1), torch.stack(deltas).view(n, q, -1, 4)


def pairwise_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of matching rows of two (..., 4) xyxy tensors."""
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area = lambda x: (x[..., 2] - x[..., 0]).clamp(min=0) * (x[..., 3] - x[..., 1]).clamp(min=0)
    return inter / (area(a) + area(b) - inter).clamp(min=1e-6)


def sample_by_rank(eligible: torch.Tensor, counts: torch.Tensor, k_max: int,
                   keys: torch.Tensor | None = None) -> torch.Tensor:
    """Per row, a uniformly random subset of ``counts[row]`` eligible columns (as a mask).

    ``keys``: the uniform random keys to rank by (drawn here when None). Samples from
    disjoint eligible sets may share one draw: their keys are still independent."""
    keys = torch.rand(eligible.shape, device=eligible.device) if keys is None else keys
    keys = keys.masked_fill(~eligible, -1.0)
    k_max = min(k_max, eligible.shape[1])
    values, index = keys.topk(k_max, dim=1)
    take = (values >= 0) & (torch.arange(k_max, device=eligible.device) < counts[:, None])
    mask = torch.zeros_like(eligible)
    mask.scatter_(1, index, take)
    return mask


def crpn_anchor_layout(anchor_sizes, aspect_ratios, p2_small: int = 0):
    """Anchor sizes per level (P2..P6) and, with a second, smaller size on P2 only, each level's
    real anchor slots (None without one).

    The CRPN's weights give every level the same number of anchors per position, so the other
    levels carry the second slot too, as a copy of the first that is never trained nor proposed
    (slot order is torchvision's: aspect ratio, then size)."""
    if not p2_small:
        return tuple((int(s),) for s in anchor_sizes), None
    if p2_small >= anchor_sizes[0]:
        raise ConfigError(f"model.crpn_p2_small_anchor={p2_small} must be smaller than P2's own anchor, "
                          f"model.anchor_sizes[0]={anchor_sizes[0]}")
    sizes = ((int(anchor_sizes[0]), int(p2_small)),) + tuple((int(s), int(s)) for s in anchor_sizes[1:])
    copy = torch.tensor([True, False]).repeat(len(aspect_ratios))
    return sizes, [torch.ones_like(copy)] + [copy] * (len(anchor_sizes) - 1)


def anchor_validity(slots, grid_sizes) -> torch.Tensor | None:
    """(L*A,) True where an anchor is real, for levels of ``grid_sizes`` (H, W); None: all are."""
    if slots is None:
        return None
    return torch.cat([level.repeat(h * w) for level, (h, w) in zip(slots, grid_sizes)])


def anchor_labels(anchors: torch.Tensor, targets: torch.Tensor, fg_iou: float, bg_iou: float,
                  valid: torch.Tensor | None = None) -> torch.Tensor:
    """(R, A_total) labels: 1 for IoU >= fg or the best anchor of the row, 0 below bg, -1 between
    (and for anchors that are not ``valid``: never sampled)."""
    iou = box_iou(targets, anchors)
    if valid is not None:
        iou[:, ~valid] = float("nan")  # neither below bg, above fg nor a row's best: -1
    labels = torch.full_like(iou, -1.0)
    labels[iou < bg_iou] = 0.0
    labels[iou >= fg_iou] = 1.0
    best = (iou if valid is None else iou.nan_to_num(-1.0)).max(dim=1, keepdim=True).values
    labels[(iou == best) & (best > 0)] = 1.0
    return labels


def sample_anchors(labels: torch.Tensor, per_query: int, pos_fraction: float,
                   generator: torch.Generator | None = None):
    """Balanced anchor sample per row: masks of sampled positives and negatives."""
    pos, neg = labels == 1, labels == 0
    max_pos = int(per_query * pos_fraction)
    num_pos = pos.sum(1).clamp(max=max_pos)
    num_neg = torch.minimum(neg.sum(1), per_query - num_pos)
    # no row takes more than max_pos positives: ranking only that many is the same sample;
    # positives and negatives are disjoint, so one draw of keys serves both
    keys = torch.rand(labels.shape, device=labels.device, generator=generator)
    return sample_by_rank(pos, num_pos, max_pos, keys), sample_by_rank(neg, num_neg, per_query, keys)


def fpn_grid_sizes(size: tuple[int, int], levels: int = 5) -> list[tuple[int, int]]:
    """The (H, W) of P2..P6 for an image of ``size``: a stride-2 stage (3x3 conv or pool with
    padding 1, P6's 1x1 pool) maps n to ceil(n / 2); P2 is two of them below the stem's."""
    h, w = size
    grid = []
    for level in range(levels + 1):
        h, w = -(-h // 2), -(-w // 2)
        if level >= 1:
            grid.append((h, w))
    return grid


class CRPNTargetSampler:
    """The CRPN's anchor sample for a batch (which anchors of each query are trained as
    positives and negatives), drawn in the loader: it depends on the query boxes and the
    anchors only, never on the network, so a CPU run computes it in its loader workers, beside
    the step (9 ms of a 2-thread step at the CPU recipe's batch). Deterministic in the batch's
    sample seeds, so a resumed run draws what the uninterrupted one did. Picklable."""

    def __init__(self, view_size: int, anchor_sizes, aspect_ratios, fg_iou: float, bg_iou: float,
                 per_query: int, pos_fraction: float, p2_small_anchor: int = 0):
        self.view_size = int(view_size)
        self.anchor_sizes, self.aspect_ratios = list(anchor_sizes), list(aspect_ratios)
        self.p2_small_anchor = int(p2_small_anchor)
        self.fg_iou, self.bg_iou = fg_iou, bg_iou
        self.per_query, self.pos_fraction = per_query, pos_fraction
        self._anchors = self._valid = None

    def anchors(self) -> torch.Tensor:
        """The model's anchors for a view (:meth:`predet.modeling.predet.meta_arch.PreDet.anchors`)."""
        if self._anchors is None:
            from torchvision.models.detection.image_list import ImageList

            from predet.modeling.precision import Float32AnchorGenerator

            sizes, slots = crpn_anchor_layout(self.anchor_sizes, self.aspect_ratios, self.p2_small_anchor)
            generator = Float32AnchorGenerator(sizes, (tuple(self.aspect_ratios),) * len(sizes))
            size = (self.view_size, self.view_size)
            grid = fpn_grid_sizes(size, len(self.anchor_sizes))
            maps = [torch.empty(1, 0, *hw) for hw in grid]
            self._anchors = generator(ImageList(torch.empty(1, 3, *size), [size]), maps)[0]
            self._valid = anchor_validity(slots, grid)
        return self._anchors

    def __call__(self, b2: torch.Tensor, seeds) -> tuple[torch.Tensor, torch.Tensor]:
        """``b2`` (N, Q, 4) and the N samples' seeds -> positive and negative masks (N*Q, anchors)."""
        from predet.data.samplers import derive_seed

        labels = anchor_labels(self.anchors(), b2.reshape(-1, 4), self.fg_iou, self.bg_iou, self._valid)
        generator = torch.Generator().manual_seed(derive_seed("crpn sample", *[int(s) for s in seeds]))
        return sample_anchors(labels, self.per_query, self.pos_fraction, generator)


class CRPNLoss(nn.Module):
    """Anchor targets, sampling and losses of the CRPN for every (image, query)."""

    def __init__(self, fg_iou=0.7, bg_iou=0.3, per_query=256, pos_fraction=0.5, iou_aware=False):
        super().__init__()
        self.fg_iou, self.bg_iou = fg_iou, bg_iou
        self.per_query, self.pos_fraction = per_query, pos_fraction
        # score target of a positive anchor: 1, or the IoU of its regressed box with the query's
        # box (IoU-aware scoring, as VarifocalNet's): the score then ranks by localisation, and
        # the top box is what the held-out recall@0.5 measures
        self.iou_aware = iou_aware
        self.box_coder = Float32BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))

    def forward(self, crpn, trunk, scores, delta_w, delta_b, anchors, targets, sample=None, valid=None):
        """``sample``: the (positive, negative) anchor masks the loader drew
        (:class:`CRPNTargetSampler`), or None to draw them here; ``valid``: the real anchors
        (:func:`anchor_validity`)."""
        n, q, total = scores.shape
        if sample is None:
            labels = anchor_labels(anchors, targets.reshape(-1, 4), self.fg_iou, self.bg_iou, valid)
            sample = sample_anchors(labels, self.per_query, self.pos_fraction)
        pos, neg = sample
        if pos.shape != (n * q, total):
            raise ValueError(f"the loader's CRPN sample covers {tuple(pos.shape)} (query, anchor) pairs, "
                             f"the model has {(n * q, total)}: its anchors differ from the model's")
        sampled = pos | neg
        flat_scores = scores.reshape(n * q, total)
        row, anchor = pos.nonzero(as_tuple=True)
        img, query = row // q, row % q
        deltas = crpn.gather_deltas(trunk, delta_w, delta_b, img, query, anchor)
        boxes = targets.reshape(-1, 4)[row]
        score_targets = pos.to(flat_scores.dtype)
        if self.iou_aware:
            with torch.no_grad():
                regressed = self.box_coder.decode_single(deltas.detach(), anchors[anchor])
                score_targets[row, anchor] = pairwise_iou(regressed, boxes).to(score_targets.dtype)
        loss_score = F.binary_cross_entropy_with_logits(flat_scores[sampled], score_targets[sampled])
        target_deltas = self.box_coder.encode_single(boxes, anchors[anchor])
        loss_reg = F.smooth_l1_loss(deltas, target_deltas, beta=1 / 9, reduction="sum")
        loss_reg = loss_reg / sampled.sum().clamp(min=1)
        return {"loss_crpn_score": loss_score, "loss_crpn_reg": loss_reg}


def ranked_nms(boxes: torch.Tensor, valid: torch.Tensor, iou_thresh: float, max_keep: int | None = None,
               chunk: int = 8) -> torch.Tensor:
    """Greedy NMS in every row at once: ``boxes`` (G, K, 4), each row sorted by decreasing
    score, ``valid`` (G, K) -> kept (G, K). The same boxes as torchvision's ``nms`` on each row
    (its IoU arithmetic, ``> iou_thresh`` suppresses; invalid boxes neither kept nor
    suppressing), computed for all rows at once instead of one ``nms`` call per (image, query),
    which on the CPU was a tenth of a pre-training step. With ``max_keep``, only each row's
    first ``max_keep`` kept boxes are exact (later ones may be missing): the pass stops once
    every row has that many or nothing left."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    area = (x2 - x1) * (y2 - y1)
    suppressed = ~valid
    kept = torch.zeros_like(valid)
    count = torch.zeros(len(boxes), dtype=torch.long, device=boxes.device)
    k = boxes.shape[1]
    for start in range(0, k, chunk):
        # the overlaps of a chunk of boxes with the boxes from it on, when the pass gets there:
        # (G, chunk, K - start) stays in cache, and a pass that stops early never builds the
        # rest (the whole (G, K, K) matrix at once was 5x slower)
        end = min(start + chunk, k)
        now, later = slice(start, end), slice(start, None)
        w = (torch.minimum(x2[:, now, None], x2[:, None, later])
             - torch.maximum(x1[:, now, None], x1[:, None, later])).clamp_(min=0)
        h = (torch.minimum(y2[:, now, None], y2[:, None, later])
             - torch.maximum(y1[:, now, None], y1[:, None, later])).clamp_(min=0)
        inter = w.mul_(h)
        overlaps = inter / (area[:, now, None] + area[:, None, later] - inter) > iou_thresh
        rest = suppressed[:, later]  # a view: suppressing here suppresses in ``suppressed``
        for i in range(end - start):  # small steps, each over every row
            keep_i = ~rest[:, i]
            kept[:, start + i] = keep_i
            rest |= overlaps[:, i] & keep_i[:, None]
        if max_keep is not None and end < k:  # a check costs a sync: once per chunk
            count += kept[:, now].sum(1)
            if bool(((count >= max_keep) | suppressed[:, end:].all(1)).all()):
                break
    return kept


@torch.no_grad()
def query_proposals(crpn, trunk, scores, delta_w, delta_b, anchors, image_size,
                    pre_nms_top_n=64, nms_thresh=0.7, post_nms_top_n=16, box_coder=None):
    """Top CRPN boxes per (image, query) after NMS, padded: boxes (N, Q, K, 4), valid (N, Q, K)."""
    box_coder = box_coder or Float32BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
    scores, anchors = wide(scores), wide(anchors)  # float32 geometry (modeling/precision.py)
    n, q, total = scores.shape
    k = min(pre_nms_top_n, total)
    _, top_anchor = scores.topk(k, dim=2)  # sorted: each (image, query) row by decreasing score
    deltas = crpn.ranked_deltas(trunk, delta_w, delta_b, top_anchor).reshape(-1, 4)
    boxes = box_coder.decode_single(deltas, anchors[top_anchor.reshape(-1)])
    boxes = clip_boxes_to_image(boxes, image_size).view(n * q, k, 4)
    large = ((boxes[..., 2] - boxes[..., 0]) >= 1e-3) & ((boxes[..., 3] - boxes[..., 1]) >= 1e-3)
    kept = ranked_nms(boxes, large, nms_thresh, max_keep=post_nms_top_n)
    rank = kept.cumsum(1) - 1  # a kept box's place among its row's kept boxes
    take = kept & (rank < post_nms_top_n)
    g, col = take.nonzero(as_tuple=True)
    out = boxes.new_zeros(n * q, post_nms_top_n, 4)
    valid = torch.zeros(n * q, post_nms_top_n, dtype=torch.bool, device=boxes.device)
    out[g, rank[g, col]] = boxes[g, col]
    valid[g, rank[g, col]] = True
    return out.view(n, q, post_nms_top_n, 4), valid.view(n, q, post_nms_top_n)
