"""Every DetectorConfig setting reaches the torchvision detector; misspelt keywords fail loudly."""

from __future__ import annotations

import copy

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign

from predet.config.finetune import DetectorConfig
from predet.modeling.backbone import build_backbone
from predet.modeling.detectors import (
    PredetFasterRCNN,
    PredetMaskRCNN,
    PredetRetinaNet,
    accepted_kwargs,
    build_detector,
    construct,
    with_torchvision_poolers,
)
from predet.modeling.poolers import SparseMultiScaleRoIAlign

TINY = dict(backbone="resnet18", fpn_channels=32, box_head_dim=64, mask_head_dim=16)
ODD = dict(detections_per_image=300, score_thresh=0.123, min_size=96, max_size=160,
           rpn_pre_nms_top_n_test=77, rpn_post_nms_top_n_test=55, rpn_pre_nms_top_n_train=99,
           rpn_post_nms_top_n_train=66, rpn_batch_size_per_image=33, box_batch_size_per_image=44)


@pytest.mark.parametrize("arch", ["mask_rcnn", "faster_rcnn"])
def test_two_stage_detector_gets_every_setting(arch):
    det = build_detector(DetectorConfig(arch=arch, **TINY, **ODD), num_classes=3)
    assert det.roi_heads.detections_per_img == 300  # was left at torchvision's 100
    assert det.roi_heads.score_thresh == pytest.approx(0.123)
    assert det.roi_heads.fg_bg_sampler.batch_size_per_image == 44
    assert det.rpn._pre_nms_top_n == {"training": 99, "testing": 77}
    assert det.rpn._post_nms_top_n == {"training": 66, "testing": 55}
    assert det.rpn.fg_bg_sampler.batch_size_per_image == 33
    assert det.transform.min_size == (96,) and det.transform.max_size == 160


def test_retinanet_gets_every_setting():
    det = build_detector(DetectorConfig(arch="retinanet", **TINY, **ODD), num_classes=3)
    assert det.detections_per_img == 300
    assert det.score_thresh == pytest.approx(0.123)
    assert det.transform.min_size == (96,) and det.transform.max_size == 160


@pytest.mark.parametrize("cls", [PredetMaskRCNN, PredetFasterRCNN, PredetRetinaNet])
def test_a_keyword_torchvision_would_swallow_is_an_error(cls):
    # torchvision passes unknown keywords down to GeneralizedRCNNTransform, which drops them
    # (the old bug: detections_per_img given to Faster R-CNN, whose keyword is box_detections_per_img)
    typo = "detections_per_img" if cls is not PredetRetinaNet else "box_detections_per_img"
    assert typo not in accepted_kwargs(cls)
    backbone = build_backbone("resnet18", "frozen_bn", 32)
    with pytest.raises(TypeError, match=typo):
        construct(cls, backbone, 2, **{typo: 5})


def _batch(n=2, size=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, size, size - 16 * i, generator=g) for i in range(n)]
    targets = []
    for i in range(n):
        xy = torch.rand(4, 2, generator=g) * (size - 40)
        wh = 8 + torch.rand(4, 2, generator=g) * 30
        boxes = torch.cat([xy, xy + wh], 1)
        masks = torch.zeros(4, size, size - 16 * i, dtype=torch.uint8)
        for k, (x1, y1, x2, y2) in enumerate(boxes.round().long().tolist()):
            masks[k, y1:y2, x1:x2] = 1
        targets.append({"boxes": boxes, "labels": torch.randint(1, 4, (4,), generator=g), "masks": masks})
    return images, targets


@pytest.mark.parametrize("arch", ["mask_rcnn", "faster_rcnn"])
def test_cpu_poolers_train_and_predict_like_torchvisions(arch):
    # the detectors pool with predet's CPU RoIAlign and a box head that takes its layout; with
    # torchvision's own modules on the same weights and draws: the same losses, gradients and
    # detections
    cfg = DetectorConfig(arch=arch, norm="bn", freeze_at=0, **TINY, min_size=96, max_size=96)
    torch.manual_seed(0)
    ours = build_detector(cfg, num_classes=3).double()
    assert isinstance(ours.roi_heads.box_roi_pool, SparseMultiScaleRoIAlign)
    theirs = with_torchvision_poolers(copy.deepcopy(ours))
    assert type(theirs.roi_heads.box_roi_pool) is MultiScaleRoIAlign
    images, targets = _batch()
    images = [im.double() for im in images]
    targets = [{k: v.double() if k == "boxes" else v for k, v in t.items()} for t in targets]
    losses, grads = [], []
    for model in (ours, theirs):
        torch.manual_seed(1)  # the same proposal and RoI samples
        out = model(images, targets)
        model.zero_grad()
        sum(out.values()).backward()
        losses.append(out)
        grads.append({k: p.grad for k, p in model.named_parameters() if p.grad is not None})
    assert set(losses[0]) == set(losses[1])
    for k in losses[0]:
        torch.testing.assert_close(losses[0][k], losses[1][k], rtol=1e-9, atol=1e-9)
    assert set(grads[0]) == set(grads[1]) and "roi_heads.box_head.fc6.weight" in grads[0]
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-7, atol=1e-9, msg=k)
    ours.eval(), theirs.eval()
    ours.roi_heads.score_thresh = theirs.roi_heads.score_thresh = 0.0  # untrained: keep every box
    with torch.no_grad():
        for a, b in zip(ours(images), theirs(images)):
            assert len(a["boxes"]) > 0 and set(a) == set(b)
            for k in a:
                torch.testing.assert_close(a[k], b[k], rtol=1e-7, atol=1e-9, msg=k)
