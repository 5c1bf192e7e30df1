"""The PreDet pre-training model: a two-stage detector trained without boxes (method.md §2).

Module names are chosen for transfer: ``backbone.body``/``backbone.fpn`` as in torchvision,
``crpn.trunk`` is torchvision's ``rpn.head.conv`` and ``box_head.fc6``/``fc7`` is its
``roi_heads.box_head``.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.detection.image_list import ImageList

from predet.config.pretrain import LossConfig, ModelConfig
from predet.data.views import as_float_images, colour_views
from predet.modeling.backbone import build_backbone
from predet.modeling.poolers import BoxHead, SparseMultiScaleRoIAlign
from predet.modeling.precision import Float32AnchorGenerator, compute_in_bfloat16
from predet.modeling.predet.contrastive import ContrastiveRoIHead, sample_query_rois
from predet.modeling.predet.crpn import (
    CRPNLoss,
    CRPNTargetSampler,
    QueryConditionedRPN,
    anchor_validity,
    crpn_anchor_layout,
    query_proposals,
)
from predet.modeling.predet.weak_head import WeakLabelHead, weak_label_loss

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def crpn_target_sampler(model: ModelConfig, view_size: int) -> CRPNTargetSampler:
    """What a loader needs to draw this model's CRPN anchor sample (CPU runs: pretrain.py)."""
    return CRPNTargetSampler(view_size, model.anchor_sizes, model.aspect_ratios, model.crpn_fg_iou,
                             model.crpn_bg_iou, model.crpn_anchors_per_query, model.crpn_pos_fraction,
                             model.crpn_p2_small_anchor)


class PreDet(nn.Module):
    def __init__(self, num_classes: int, model: ModelConfig | None = None, loss: LossConfig | None = None):
        super().__init__()
        self.cfg = model = model or ModelConfig()
        self.loss_cfg = loss or LossConfig()
        self.backbone = build_backbone(model.backbone, model.norm, model.fpn_channels)
        self.cls_head = WeakLabelHead(self.backbone.in_channels_list[-1], num_classes, self.loss_cfg.cls_head_norm)
        sizes, self._anchor_slots = crpn_anchor_layout(model.anchor_sizes, model.aspect_ratios,
                                                       model.crpn_p2_small_anchor)
        self.anchor_generator = Float32AnchorGenerator(sizes, (tuple(model.aspect_ratios),) * len(sizes))
        self.roi_align = SparseMultiScaleRoIAlign(["0", "1", "2", "3"], output_size=7, sampling_ratio=2,
                                                  canonical_scale=model.roi_canonical_scale)
        self.box_head = BoxHead(model.fpn_channels * 7 * 7, model.box_head_dim)
        self.crpn = QueryConditionedRPN(
            model.fpn_channels, model.box_head_dim, self.anchor_generator.num_anchors_per_location()[0],
            model.crpn_hidden, model.crpn_init_std
        )
        self.crpn_loss = CRPNLoss(
            model.crpn_fg_iou, model.crpn_bg_iou, model.crpn_anchors_per_query, model.crpn_pos_fraction,
            model.crpn_iou_aware,
        )
        self.roi_head = ContrastiveRoIHead(model.box_head_dim, model.proj_dim, model.temperature, model.roi_pos_iou)
        if model.head_dtype == "bfloat16":  # what GPU autocast does with these layers
            compute_in_bfloat16(self.box_head.fc6, self.box_head.fc7, self.crpn.trunk[0][0],
                                *self.crpn.score_generator[::2], *self.crpn.delta_generator[::2],
                                *self.roi_head.projection[::2])
        self._anchor_cache: dict = {}
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def features(self, images: torch.Tensor, view2: torch.Tensor | None = None, fpn: bool = True):
        """Backbone on a batch (or on two views: their 2N images), -> (C5, FPN maps or None).

        ``fpn=False`` skips the FPN, which classification alone does not use."""
        if view2 is not None and self.cfg.per_view_bn:
            c5_1, fpn1 = self.features(images, fpn=fpn)
            c5_2, fpn2 = self.features(view2, fpn=fpn)
            maps = {k: torch.cat([fpn1[k], fpn2[k]]) for k in fpn1} if fpn else None
            return torch.cat([c5_1, c5_2]), maps
        if view2 is not None:
            images = torch.cat([images, view2])
        body = self.backbone.body(self.normalize(images))
        return body["3"], self.backbone.fpn(body) if fpn else None

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (as the loader sends them) or [0, 1] float images -> the backbone's input."""
        return (as_float_images(images) - self.pixel_mean) / self.pixel_std

    @staticmethod
    def views(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's two views as [0, 1] floats with their colour changes, made here on the
        model's device from the uint8 crops and parameters the loader sends (data/views.py)."""
        return (colour_views(batch["view1"], batch.get("colour1")),
                colour_views(batch["view2"], batch.get("colour2")))

    def _anchor_set(self, images: torch.Tensor, fpn: dict) -> tuple:
        """(anchors, validity) of one view size, cached: they depend on the sizes only."""
        size = tuple(images.shape[-2:])
        grid = [tuple(f.shape[-2:]) for f in fpn.values()]
        key = (size, tuple(grid), images.device)
        if key not in self._anchor_cache:  # one view size, one set
            valid = anchor_validity(self._anchor_slots, grid)
            self._anchor_cache = {key: (self.anchor_generator(ImageList(images[:1], [size]), list(fpn.values()))[0],
                                        None if valid is None else valid.to(images.device))}
        return self._anchor_cache[key]

    def anchors(self, images: torch.Tensor, fpn: dict) -> torch.Tensor:
        """Anchors of one view (all views of a batch share a size): (L*A, 4), float32 whatever
        the maps' dtype (modeling/precision.py)."""
        return self._anchor_set(images, fpn)[0]

    def anchor_validity(self, images: torch.Tensor, fpn: dict) -> torch.Tensor | None:
        """Which of :meth:`anchors` are real (``model.crpn_p2_small_anchor``); None: all of them."""
        return self._anchor_set(images, fpn)[1]

    def embed_boxes(self, fpn: dict, boxes: torch.Tensor, size) -> torch.Tensor:
        """Box-head features of (N, K, 4) boxes, flattened to (N*K, D)."""
        return self.box_head(self.roi_align(fpn, list(boxes), [size] * boxes.shape[0]))

    @staticmethod
    def split_views(fpn: dict, n: int):
        """FPN maps of the 2N-image batch -> (view 1 maps, view 2 maps)."""
        return {k: v[:n] for k, v in fpn.items()}, {k: v[n:] for k, v in fpn.items()}

    def query_scores(self, fpn2: dict, z: torch.Tensor, n: int):
        """The CRPN on view 2 for query embeddings ``z`` (N*Q, D): trunk, delta weights, scores."""
        trunk = self.crpn.trunk_features(list(fpn2.values()))
        sw, sb, dw, db = self.crpn.dynamic_weights(z.view(n, -1, z.shape[-1]))
        return trunk, dw, db, self.crpn.scores(trunk, sw, sb)

    def proposals(self, trunk, dw, db, scores, anchors, size, top_n: int, valid_anchors=None):
        m = self.cfg
        pre_nms_top_n = m.pre_nms_top_n
        if valid_anchors is not None:  # the unused slots of a P2-only anchor size are never proposed
            scores = scores.masked_fill(~valid_anchors, float("-inf"))
            pre_nms_top_n = min(pre_nms_top_n, int(valid_anchors.sum()))  # not even on tiny views
        return query_proposals(self.crpn, trunk, scores, dw, db, anchors, size, pre_nms_top_n, m.nms_thresh, top_n)

    def forward(self, batch: dict) -> dict:
        lam = self.loss_cfg
        view1, view2 = self.views(batch)
        n = view1.shape[0]
        pretext = lam.lambda_rpn > 0 or lam.lambda_roi > 0
        c5, fpn = self.features(view1, view2, fpn=pretext)
        out = {}
        if lam.lambda_cls > 0:
            logits = self.cls_head(c5)
            targets = batch["labels"].repeat(2, 1)
            out["loss_cls"] = lam.lambda_cls * weak_label_loss(logits, targets, lam.cls_loss)
        if not pretext:
            return out
        fpn1, fpn2 = self.split_views(fpn, n)
        size = tuple(view1.shape[-2:])
        b2 = batch["b2"]
        z = self.embed_boxes(fpn1, batch["b1"], size)  # (N*Q, D)

        with torch.set_grad_enabled(torch.is_grad_enabled() and lam.lambda_rpn > 0):
            trunk, dw, db, scores = self.query_scores(fpn2, z, n)
            anchors, real = self.anchors(view2, fpn2), self.anchor_validity(view2, fpn2)
            if lam.lambda_rpn > 0:
                sample = (batch["crpn_pos"], batch["crpn_neg"]) if "crpn_pos" in batch else None
                losses = self.crpn_loss(self.crpn, trunk, scores, dw, db, anchors, b2, sample, real)
                out.update({k: lam.lambda_rpn * v for k, v in losses.items()})
        if lam.lambda_roi > 0:
            m = self.cfg
            proposals, valid = self.proposals(trunk, dw, db, scores, anchors, size, m.post_nms_top_n, real)
            rois, roi_image = sample_query_rois(proposals, valid, b2, m.rois_per_query, m.roi_pos_fraction, m.roi_pos_iou)
            # RoIs come grouped by image, the order MultiScaleRoIAlign concatenates them in.
            roi_boxes = [rois[roi_image == i] for i in range(n)]
            roi_feats = self.box_head(self.roi_align(fpn2, roi_boxes, [size] * n))
            losses = self.roi_head(z, roi_feats, rois, roi_image, b2)
            out["loss_nce"] = lam.lambda_roi * losses["loss_nce"]
            out["loss_roi_reg"] = lam.lambda_roi * losses["loss_roi_reg"]
            out["acc_nce"] = losses["acc_nce"]
        return out
