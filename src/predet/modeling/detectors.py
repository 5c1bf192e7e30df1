"""Detector builders: torchvision Mask R-CNN, Faster R-CNN and RetinaNet on predet backbones.

The modules keep torchvision's names (``backbone.body``, ``backbone.fpn``, ``rpn.head.conv``,
``roi_heads.box_head.fc6/fc7``), so pre-trained PreDet weights and exported weights line up
with plain torchvision models.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.models.resnet import Bottleneck
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from predet.checkpoint.io import load_checkpoint
from predet.config.base import from_dict
from predet.config.choices import ARCHS
from predet.config.finetune import DetectorConfig, FinetuneConfig
from predet.errors import CheckpointError
from predet.modeling.backbone import build_backbone
from predet.modeling.poolers import BoxHead, SparseMultiScaleRoIAlign
from predet.modeling.precision import float32_box_geometry

LEVELS = ["0", "1", "2", "3"]  # the FPN maps the RoI heads pool from (P2-P5)


class BatchInput:
    """Lets the shared trainer call a torchvision detector as ``model(batch)``, and takes images
    as uint8 (what the loaders send: a quarter of float32's bytes) as well as [0, 1] floats.

    A mixin, not a wrapper, so the state dict keeps torchvision's names exactly.
    """

    def forward(self, images, targets=None):
        if isinstance(images, dict):
            images, targets = images["images"], images.get("targets")
        images = [im.float().div_(255.0) if im.dtype == torch.uint8 else im for im in images]
        return super().forward(images, targets)


class PredetMaskRCNN(BatchInput, MaskRCNN):
    pass


class PredetFasterRCNN(BatchInput, FasterRCNN):
    pass


class PredetRetinaNet(BatchInput, RetinaNet):
    """torchvision's RetinaNet names its losses ``classification`` and ``bbox_regression``; the
    trainer sums the outputs whose names start with ``loss``, so they get that prefix here."""

    def forward(self, images, targets=None):
        out = super().forward(images, targets)
        if isinstance(out, dict):
            return {k if k.startswith("loss") else f"loss_{k}": v for k, v in out.items()}
        return out


def freeze_stages(body: nn.Module, freeze_at: int) -> None:
    """Freeze the stem (1) and then the first residual stages, as Detectron2's FREEZE_AT."""
    stem = ("conv1", "bn1", "stem")
    for name, param in body.named_parameters():
        top = name.split(".")[0]
        stage = 1 if top in stem else None
        if top.startswith("layer"):
            stage = int(top[5:]) + 1
        elif name.startswith("trunk_output.block"):
            stage = int(name.split(".")[1][5:]) + 1
        if stage is not None and stage <= freeze_at:
            param.requires_grad_(False)


def move_stride_to_1x1(body: nn.Module) -> None:
    """Downsample in each bottleneck's 1x1 conv instead of its 3x3 (Detectron2's STRIDE_IN_1X1),
    so weights trained that way compute what they were trained to. Basic blocks (ResNet-18/34)
    have no 1x1 conv and downsample alike in both frameworks: nothing moves."""
    for block in (m for m in body.modules() if isinstance(m, Bottleneck)):
        if block.conv2.stride != (1, 1):
            block.conv1.stride, block.conv2.stride = block.conv2.stride, (1, 1)


def stride_in_1x1(detector: nn.Module) -> bool | None:
    """Where the detector's bottlenecks downsample: True in the 1x1, False in the 3x3, None
    when it has none (ResNet-18/34 and RegNets, where the question does not arise)."""
    for block in detector.modules():
        if isinstance(block, Bottleneck) and (block.conv1.stride != (1, 1) or block.conv2.stride != (1, 1)):
            return block.conv1.stride != (1, 1)
    return None


def _anchor_generator(cfg: DetectorConfig, retinanet: bool) -> AnchorGenerator:
    if retinanet:  # three octave scales per level, as in the RetinaNet paper
        sizes = tuple(tuple(int(s * 2 ** (k / 3)) for k in range(3)) for s in cfg.anchor_sizes)
    else:
        sizes = tuple((s,) for s in cfg.anchor_sizes)
    return AnchorGenerator(sizes, (tuple(cfg.aspect_ratios),) * len(sizes))


# Each torchvision detector hands the keywords it does not name on down this chain, and the last
# one (GeneralizedRCNNTransform) swallows whatever is left: a misspelt keyword is silently dropped.
KWARG_CHAINS = {
    PredetMaskRCNN: (MaskRCNN, FasterRCNN, GeneralizedRCNNTransform),
    PredetFasterRCNN: (FasterRCNN, GeneralizedRCNNTransform),
    PredetRetinaNet: (RetinaNet, GeneralizedRCNNTransform),
}


def accepted_kwargs(cls: type) -> set[str]:
    """Keywords some constructor in ``cls``'s chain names explicitly (not via ``**kwargs``)."""
    names = set()
    for owner in KWARG_CHAINS[cls]:
        for p in inspect.signature(owner.__init__).parameters.values():
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self":
                names.add(p.name)
    return names


def construct(cls: type, *args, **kwargs) -> nn.Module:
    """``cls(*args, **kwargs)``, but a keyword torchvision would silently ignore is a TypeError."""
    unknown = sorted(set(kwargs) - accepted_kwargs(cls))
    if unknown:
        raise TypeError(f"{cls.__name__} does not take {', '.join(unknown)}: torchvision would ignore it")
    return cls(*args, **kwargs)


def build_detector(cfg: DetectorConfig, num_classes: int) -> nn.Module:
    """A torchvision detector for ``num_classes`` foreground classes (labels 1..K), random weights."""
    if cfg.arch not in ARCHS:
        raise ValueError(f"unknown detector {cfg.arch!r}; choose one of {', '.join(ARCHS)}")
    c = cfg.fpn_channels
    common = dict(min_size=cfg.min_size, max_size=cfg.max_size)
    if cfg.arch == "retinanet":
        backbone = build_backbone(cfg.backbone, cfg.norm, c, stages=(2, 3, 4), extra_blocks=LastLevelP6P7(c, c))
        if cfg.stride_in_1x1:
            move_stride_to_1x1(backbone.body)
        freeze_stages(backbone.body, cfg.freeze_at)
        return float32_box_geometry(construct(
            PredetRetinaNet, backbone, num_classes + 1, anchor_generator=_anchor_generator(cfg, True),
            score_thresh=cfg.score_thresh, detections_per_img=cfg.detections_per_image, **common))
    backbone = build_backbone(cfg.backbone, cfg.norm, c)
    if cfg.stride_in_1x1:
        move_stride_to_1x1(backbone.body)
    freeze_stages(backbone.body, cfg.freeze_at)
    anchors = _anchor_generator(cfg, False)
    kwargs = dict(
        rpn_anchor_generator=anchors,
        rpn_head=RPNHead(c, anchors.num_anchors_per_location()[0]),
        rpn_batch_size_per_image=cfg.rpn_batch_size_per_image,
        rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_top_n_train,
        rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
        # torchvision's default poolers and box head, with the CPU's faster RoIAlign (the same
        # numbers; its backward was a third of a CPU fine-tuning step): modeling/poolers.py
        box_roi_pool=SparseMultiScaleRoIAlign(LEVELS, output_size=7, sampling_ratio=2),
        box_head=BoxHead(c * 7 * 7, cfg.box_head_dim),
        box_predictor=FastRCNNPredictor(cfg.box_head_dim, num_classes + 1),
        box_batch_size_per_image=cfg.box_batch_size_per_image,
        box_score_thresh=cfg.score_thresh,
        box_detections_per_img=cfg.detections_per_image,
        **common,
    )
    if cfg.arch == "faster_rcnn":
        return float32_box_geometry(construct(PredetFasterRCNN, backbone, None, **kwargs))
    m = cfg.mask_head_dim
    return float32_box_geometry(construct(
        PredetMaskRCNN,
        backbone, None, mask_roi_pool=SparseMultiScaleRoIAlign(LEVELS, output_size=14, sampling_ratio=2),
        mask_head=MaskRCNNHeads(c, [m] * 4, 1),
        mask_predictor=MaskRCNNPredictor(m, m, num_classes + 1), **kwargs,
    ))


def with_torchvision_poolers(detector: nn.Module) -> nn.Module:
    """The same detector with torchvision's own RoIAlign modules and box head: the reference
    predet's CPU pooling is tested and benchmarked against. Changes ``detector`` in place."""
    roi = getattr(detector, "roi_heads", None)
    if roi is None:  # RetinaNet pools nothing
        return detector
    roi.box_roi_pool = MultiScaleRoIAlign(LEVELS, output_size=7, sampling_ratio=2)
    head = TwoMLPHead(roi.box_head.fc6.in_features, roi.box_head.fc6.out_features).to(roi.box_head.fc6.weight)
    head.load_state_dict(roi.box_head.state_dict())
    roi.box_head = head
    if roi.has_mask():
        roi.mask_roi_pool = MultiScaleRoIAlign(LEVELS, output_size=14, sampling_ratio=2)
    return detector


def load_detector(checkpoint: str | Path):
    """A fine-tuned detector and its training config, from a checkpoint of ``predet finetune``."""
    return detector_from_checkpoint(load_checkpoint(checkpoint), checkpoint)


def detector_from_checkpoint(ckpt: dict, source: str | Path = "checkpoint"):
    """``load_detector`` for a checkpoint already read (so callers read the file once)."""
    if ckpt.get("extra_state", {}).get("kind") != "predet_finetune":
        raise CheckpointError(f"{source}: not a predet finetune checkpoint (no extra_state.kind="
                              "'predet_finetune'); give a checkpoint written by predet finetune")
    cfg = from_dict(FinetuneConfig, ckpt["config"])
    detector = build_detector(cfg.model, num_classes=len(ckpt["extra_state"]["cat_ids"]))
    detector.load_state_dict(ckpt["model"])
    return detector.eval(), cfg, ckpt["extra_state"]
