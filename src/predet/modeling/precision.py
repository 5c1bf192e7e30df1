"""Float32 where mixed precision would break geometry: anchors, boxes, IoU, NMS, box losses.

Under bf16 autocast the feature maps are bf16, and whatever is built from them inherits it:
torchvision's AnchorGenerator makes its anchors in the feature dtype and its BoxCoder decodes
in the dtype of the deltas. bf16 keeps 8 significant bits, so at 800 px anchors and proposals
land on a 4-pixel grid (8 px past 1024), training and evaluation (which runs in float32) see
different anchors, and NMS's per-group offset trick loses whole boxes. Here the geometry runs
in float32 on float32 inputs, with autocast off for the few matrix products whose outputs are
box coordinates or the scores that rank boxes (the CRPN's dynamic 1x1 conv, the RPN's and box
predictor's last layers, the contrastive similarities). The convolutions and FC layers that
carry the compute stay in the autocast dtype.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList


def wide(tensor: Tensor) -> Tensor:
    """``tensor`` in float32, or as it is when already float32 or wider (float64 in the checks)."""
    return tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()


def autocast_off(tensor: Tensor):
    """A block without autocast on ``tensor``'s device (cast its inputs to float yourself)."""
    return torch.autocast(tensor.device.type, enabled=False) if tensor.device.type in ("cpu", "cuda") \
        else contextlib.nullcontext()


class Float32AnchorGenerator(AnchorGenerator):
    """torchvision's anchors, always float32: only the maps' sizes are read, never their dtype."""

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        shapes = [f.new_empty((0, 0, *f.shape[-2:]), dtype=torch.float32) for f in feature_maps]
        return super().forward(image_list, shapes)


class Float32BoxCoder(BoxCoder):
    """torchvision's BoxCoder, encoding and decoding in float32 whatever the deltas' dtype."""

    def encode_single(self, reference_boxes: Tensor, proposals: Tensor) -> Tensor:
        return super().encode_single(wide(reference_boxes), wide(proposals))

    def decode_single(self, rel_codes: Tensor, boxes: Tensor) -> Tensor:
        return super().decode_single(wide(rel_codes), wide(boxes))


class Float32Linear(nn.Linear):
    """An ``nn.Linear`` that computes in float32 under autocast (same parameters and names)."""

    def forward(self, x: Tensor) -> Tensor:
        with autocast_off(x):
            return super().forward(wide(x))


class Float32Conv2d(nn.Conv2d):
    """An ``nn.Conv2d`` that computes in float32 under autocast (same parameters and names)."""

    def forward(self, x: Tensor) -> Tensor:
        with autocast_off(x):
            return super().forward(wide(x))


_FLOAT32 = {nn.Linear: Float32Linear, nn.Conv2d: Float32Conv2d}


def bf16_product(x: Tensor, product) -> Tensor:
    """``product(x16, cast)`` in bf16, returned in ``x``'s dtype. Outside autocast only: under
    autocast the autocast dtype decides, as for every other layer."""
    return product(x.to(torch.bfloat16), lambda t: t.to(torch.bfloat16)).to(x.dtype)


class Bfloat16Linear(nn.Linear):
    """An ``nn.Linear`` whose product runs in bf16 outside autocast (float32 parameters, bias
    and output; the kernels accumulate in float32). On CPUs with AVX512-BF16 or AMX the
    product is 4-6x faster than in float32 (benchmarks/pretrain_speed.py)."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype != torch.float32 or torch.is_autocast_enabled(x.device.type):
            return super().forward(x)
        out = bf16_product(x, lambda x16, cast: F.linear(x16, cast(self.weight)))
        return out if self.bias is None else out + self.bias


class Bfloat16Conv2d(nn.Conv2d):
    """An ``nn.Conv2d`` computing in bf16 outside autocast, as :class:`Bfloat16Linear`."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype != torch.float32 or torch.is_autocast_enabled(x.device.type):
            return super().forward(x)
        out = bf16_product(x, lambda x16, cast: self._conv_forward(x16, cast(self.weight), None))
        return out if self.bias is None else out + self.bias.view(1, -1, 1, 1)


_BFLOAT16 = {nn.Linear: Bfloat16Linear, nn.Conv2d: Bfloat16Conv2d}


def compute_in_bfloat16(*modules: nn.Module) -> None:
    """Make these Linear/Conv2d layers multiply in bf16 outside autocast, in place (their state
    dict keys stay as they are). For the pretext heads of a float32 CPU run: their products
    are what a step adds to the backbone's, and bf16 runs them several times faster."""
    for module in modules:
        module.__class__ = _BFLOAT16.get(type(module), type(module))
        if not isinstance(module, (Bfloat16Linear, Bfloat16Conv2d)):
            raise TypeError(f"compute_in_bfloat16 takes nn.Linear or nn.Conv2d layers, got {type(module).__name__}")


def keep_float32(*modules: nn.Module) -> None:
    """Make these Linear/Conv2d layers compute in float32 under autocast, in place: their state
    dict keys stay as they are, so transfer and export see the same model."""
    for module in modules:
        module.__class__ = _FLOAT32.get(type(module), type(module))
        if not isinstance(module, (Float32Linear, Float32Conv2d)):
            raise TypeError(f"keep_float32 takes nn.Linear or nn.Conv2d layers, got {type(module).__name__}")


def float32_box_geometry(detector: nn.Module) -> nn.Module:
    """A torchvision Faster/Mask R-CNN or RetinaNet whose anchors, box coding and box outputs
    are float32 under autocast (in place; returns it)."""
    for owner in (getattr(detector, "rpn", None), detector):
        if isinstance(getattr(owner, "anchor_generator", None), AnchorGenerator):
            owner.anchor_generator.__class__ = Float32AnchorGenerator
    for owner in (getattr(detector, "rpn", None), getattr(detector, "roi_heads", None), detector):
        coder = getattr(owner, "box_coder", None)
        if isinstance(coder, BoxCoder):
            coder.__class__ = Float32BoxCoder
    if hasattr(detector, "rpn"):
        keep_float32(detector.rpn.head.cls_logits, detector.rpn.head.bbox_pred)
    predictor = getattr(getattr(detector, "roi_heads", None), "box_predictor", None)
    if predictor is not None:
        keep_float32(predictor.cls_score, predictor.bbox_pred)
    head = getattr(detector, "head", None)
    if head is not None and hasattr(head, "regression_head"):
        keep_float32(head.regression_head.bbox_reg)
    return detector
