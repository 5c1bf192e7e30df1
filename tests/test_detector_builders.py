"""Every DetectorConfig setting reaches the torchvision detector; misspelt keywords fail loudly."""

from __future__ import annotations

import pytest

from predet.detection.models import (
    DetectorConfig,
    PredetFasterRCNN,
    PredetMaskRCNN,
    PredetRetinaNet,
    accepted_kwargs,
    build_detector,
    construct,
)
from predet.models.backbone import build_backbone

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
