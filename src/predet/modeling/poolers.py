"""Multi-scale RoIAlign as one weighted-sum op over all levels, for the CPU.

torchvision's CPU RoIAlign backward recomputes every bilinear weight once per channel, which
made it a fifth of a CPU pre-training step. RoIAlign is linear in the features: each output
cell is a fixed weighted sum of ``4 * sampling_ratio**2`` feature positions (the samples' four
corners). Those sums pool all levels at once (``embedding_bag``), and the gradient is the
transposed product with the same weights as a sparse (RoI cells x feature positions) matrix. The numbers are
torchvision's (``aligned=False``; ``tests/modeling/test_roi_pool.py``). Anything this path does not cover
(other devices, half precision, an adaptive ``sampling_ratio``, a non-square output, levels that
are not consecutive strides) runs torchvision's own module.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.poolers import initLevelMapper

from predet.modeling.precision import Bfloat16Linear


def _sample_weights(start: Tensor, length: Tensor, size: Tensor, bins: int, ratio: int):
    """Per RoI, the two neighbours and their weights along one axis for every sample point:
    indices and weights of shape (R, bins, ratio, 2), following torchvision's bilinear rule
    (outside [-1, size]: zero; below 0: 0; at or past size - 1: the last row). ``size`` is each
    RoI's level's extent along the axis, (R,)."""
    steps = (torch.arange(bins * ratio, dtype=start.dtype, device=start.device) + 0.5) / ratio
    pos = start[:, None] + steps[None] * (length / bins)[:, None]
    size = size.to(pos.dtype)[:, None]
    inside = (pos >= -1.0) & (pos <= size)
    last = size - 1.0
    pos = torch.minimum(pos.clamp(min=0.0), last)  # before the cast: a huge coordinate must not overflow int64
    low = pos.floor()
    pos = torch.where(low >= last, low, pos)
    high = torch.minimum(low + 1, last)
    frac = pos - low
    index = torch.stack([low, high], -1).long()
    weight = torch.stack([1.0 - frac, frac], -1) * inside[..., None]
    shape = (len(start), bins, ratio, 2)
    return index.view(shape), weight.view(shape)


def _axis_corners(start: Tensor, length: Tensor, size: Tensor, bins: int, ratio: int):
    """Per RoI and bin along one axis, the ``2 * ratio`` rows (or columns) its samples' corners
    fall on and their weights, (R, bins, 2 * ratio) each, sorted by position (so the bags that
    combine them come out sorted: :func:`roi_align_bags`)."""
    index, weight = _sample_weights(start, length, size, bins, ratio)
    shape = (len(start), bins, 2 * ratio)
    index, order = index.view(shape).sort(-1)
    return index, weight.view(shape).gather(-1, order)


def _merge_repeats(index: Tensor, weight: Tensor) -> Tensor:
    """A sorted corner list's weights with each run of one index summed into its first entry and
    the repeats at zero (so a repeated corner row adds nothing after it: :func:`roi_align_bags`)."""
    first = torch.ones_like(index, dtype=torch.bool)
    first[..., 1:] = index[..., 1:] != index[..., :-1]
    run = first.cumsum(-1) - 1
    summed = torch.zeros_like(weight).scatter_add_(-1, run, weight)
    return torch.where(first, summed.gather(-1, run), 0.0)


def roi_align_bags(rois: Tensor, levels: Tensor, shapes: list[tuple[int, int, int]], scales: list[float],
                   output_size: int, sampling_ratio: int) -> tuple[Tensor, Tensor]:
    """The weighted sums RoIAlign takes: for every output cell, the ``4 * sampling_ratio**2``
    feature positions its samples' corners fall on and their weights, (R * out * out, 4 s^2)
    each, cells in row-major order, each row's positions in non-decreasing order (a corner that
    several samples share repeated side by side, or carried at weight zero). Positions index the levels' (N*H*W) positions laid one after another.

    ``rois`` is (R, 5) ``[image, x1, y1, x2, y2]``; ``shapes`` is (N, H, W) per level; each cell
    averages the ``sampling_ratio**2`` bilinear samples that fall in it. All levels at once:
    each RoI carries its level's scale, size and offset. A cell's entries are every pair of a
    corner row and a corner column, so they are built from the two axes' short lists with one
    broadcast over a 16-wide last axis (a broadcast over the 2-wide corner axes was 8x slower)."""
    r, out, s = len(rois), output_size, sampling_ratio
    dtype, device = rois.dtype, rois.device
    scale = torch.tensor(scales, dtype=dtype, device=device)[levels]
    sizes = [n * h * w for n, h, w in shapes]
    offset = torch.tensor([0] + sizes[:-1], device=device).cumsum(0)[levels]
    h = torch.tensor([hh for _, hh, _ in shapes], device=device)[levels]
    w = torch.tensor([ww for _, _, ww in shapes], device=device)[levels]
    x1, y1, x2, y2 = (rois[:, 1:] * scale[:, None]).unbind(1)
    iy, wy = _axis_corners(y1, (y2 - y1).clamp(min=1.0), h, out, s)  # (R, out, 2s)
    ix, wx = _axis_corners(x1, (x2 - x1).clamp(min=1.0), w, out, s)
    wy = _merge_repeats(iy, wy)
    per_roi = (r, 1, 1)
    # a corner row's first position; rows are w apart and columns < w, so (row, column) pairs
    # taken row-major are in increasing position order
    row_start = offset.view(per_roi) + (rois[:, 0].long().view(per_roi) * h.view(per_roi) + iy) * w.view(per_roi)
    m, k = 2 * s, 4 * s * s

    def pairs(y: Tensor, x: Tensor, combine) -> Tensor:
        y = y.view(r, out, 1, m, 1).expand(r, out, 1, m, m).reshape(r, out, 1, k)
        x = x.view(r, 1, out, 1, m).expand(r, 1, out, m, m).reshape(r, 1, out, k)
        return combine(y, x).view(-1, k)

    # a repeated corner row (a small or clamped RoI) would start its columns again; its weights
    # are zero (merged into the first), so its entries may sit on the cell's last position
    cols = pairs(row_start, ix, torch.add).cummax(1).values
    return cols, pairs(wy / (s * s), wx, torch.mul)


def bags_to_csr(cols: Tensor, vals: Tensor, num_positions: int, rows_sorted: bool = False) -> Tensor:
    """The (cells x positions) sparse CSR matrix of :func:`roi_align_bags`: a valid one by
    torch's rules (sorted, shared corners summed), built row by row rather than by a global
    coalesce, which sorted every entry and was most of the pooling's time. ``rows_sorted``:
    each row's positions are already in order (as :func:`roi_align_bags` makes them), so the
    per-row sort is skipped."""
    rows, k = cols.shape
    if not rows_sorted:
        cols, order = cols.sort(1)
        vals = vals.gather(1, order)
    first = torch.ones_like(cols, dtype=torch.bool)
    first[:, 1:] = cols[:, 1:] != cols[:, :-1]
    slot = first.cumsum(1)  # 1 + each entry's place among its row's distinct positions
    crow = torch.zeros(rows + 1, dtype=torch.long, device=cols.device)
    torch.cumsum(slot[:, -1], 0, out=crow[1:])
    # shared corners summed into their first entry's place in the matrix's values
    slot += crow[:-1, None] - 1
    values = vals.new_zeros(int(crow[-1])).index_add_(0, slot.view(-1), vals.reshape(-1))
    with warnings.catch_warnings():  # "CSR support is in beta": the product and its gradient are tested
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, cols[first], values, (rows, num_positions),
                                       check_invariants=False)  # valid by construction: tests/modeling/test_roi_pool.py


class _PoolBags(torch.autograd.Function):
    """Forward: ``embedding_bag``'s weighted sums (4x faster than the sparse product on the
    CPU); backward: the transposed sparse product (``embedding_bag``'s own backward is 5x slower)."""

    @staticmethod
    def forward(ctx, flat: Tensor, cols: Tensor, vals: Tensor) -> Tensor:
        ctx.save_for_backward(cols, vals)
        ctx.num_positions = flat.shape[0]
        return F.embedding_bag(cols, flat, per_sample_weights=vals, mode="sum")

    @staticmethod
    def backward(ctx, grad: Tensor):
        cols, vals = ctx.saved_tensors
        return bags_to_csr(cols, vals, ctx.num_positions, rows_sorted=True).t() @ grad, None, None


class SparseMultiScaleRoIAlign(MultiScaleRoIAlign):
    """torchvision's MultiScaleRoIAlign (same level mapping, same numbers), pooled by one
    sparse matrix product on the CPU."""

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        features = [v for k, v in x.items() if k in self.featmap_names]
        out_h, out_w = self.output_size
        if (features[0].device.type != "cpu" or features[0].dtype not in (torch.float32, torch.float64)
                or self.sampling_ratio <= 0 or out_h != out_w or not _consecutive_strides(features)):
            return super().forward(x, boxes, image_shapes)
        scales = self._level_scales(features, image_shapes)
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], 1) for i, b in enumerate(boxes)])
        rois = rois.detach().to(features[0].dtype)
        levels = self.map_levels(boxes) if len(features) > 1 else torch.zeros(len(rois), dtype=torch.long)
        cols, vals = roi_align_bags(rois, levels, [(f.shape[0], f.shape[2], f.shape[3]) for f in features],
                                    scales, out_h, self.sampling_ratio)
        # every level as (positions, channels), one after another: the positions the bags index
        flat = torch.cat([f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]) for f in features])
        pooled = _PoolBags.apply(flat, cols, vals)  # (R * out * out, C)
        return pooled.view(len(rois), out_h, out_w, flat.shape[1]).permute(0, 3, 1, 2)

    def _level_scales(self, features: list[Tensor], image_shapes: list[tuple[int, int]]) -> list[float]:
        """Each level's stride as a power of two, and the level mapper (as torchvision sets them up)."""
        if self.scales is None or self.map_levels is None:
            height = max(s[0] for s in image_shapes)  # torchvision infers the stride from the heights
            self.scales = [2.0 ** round(math.log2(f.shape[-2] / height)) for f in features]
            k_min, k_max = -math.log2(self.scales[0]), -math.log2(self.scales[-1])
            self.map_levels = initLevelMapper(int(k_min), int(k_max), self.canonical_scale, self.canonical_level)
        return self.scales


def _consecutive_strides(features: list[Tensor]) -> bool:
    """Each level is the previous one halved (what the level mapper assumes)."""
    return all((a.shape[-2] + 1) // 2 == b.shape[-2] for a, b in zip(features, features[1:]))


class BoxHead(TwoMLPHead):
    """torchvision's TwoMLPHead (the same ``fc6``/``fc7`` weights and numbers) that takes the
    CPU RoIAlign's channels-last features as they are: fc6's weight is permuted to match them,
    a copy of the weight instead of every RoI's features and their gradient (3 % of a CPU
    pre-training step)."""

    def forward(self, pooled: Tensor) -> Tensor:
        r, c, h, w = pooled.shape
        cells_last = pooled.permute(0, 2, 3, 1)
        if pooled.is_contiguous() or not cells_last.is_contiguous():
            return super().forward(pooled)
        fc6 = self.fc6
        weight = fc6.weight.view(fc6.out_features, c, h, w).permute(0, 2, 3, 1)
        x = cells_last.reshape(r, -1)
        if isinstance(fc6, Bfloat16Linear) and x.dtype == torch.float32 and not torch.is_autocast_enabled(x.device.type):
            # permuted and rounded in one copy
            weight = weight.to(torch.bfloat16, memory_format=torch.contiguous_format).view(fc6.out_features, -1)
            x = F.linear(x.to(torch.bfloat16), weight).to(x.dtype) + fc6.bias
        else:
            x = F.linear(x, weight.reshape(fc6.out_features, -1), fc6.bias)
        return F.relu(self.fc7(F.relu(x)))
