"""The Detectron2 export puts class-specific layers in Detectron2's layout, checked by its rules:
background last in cls_score, no background box regressor or mask, RetinaNet anchors size-major
without a background logit. Detectron2 itself is not installable here; README says how to check
there."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import yaml

from predet.checkpoint.export import (
    detectron2_config,
    detectron2_state_dict,
    write_detectron2_config,
)
from predet.config.finetune import DetectorConfig
from predet.modeling.detectors import build_detector

K = 3
TINY = dict(backbone="resnet18", fpn_channels=32, box_head_dim=64, mask_head_dim=16)


def detector(arch, **kw):
    torch.manual_seed(0)
    return build_detector(DetectorConfig(arch=arch, **{**TINY, **kw}), K)


def test_box_and_mask_predictors_follow_detectron2_rules():
    det = detector("mask_rcnn")
    tv = det.state_dict()
    d2 = {k: torch.from_numpy(v) for k, v in detectron2_state_dict(det).items()}
    w, b = d2["roi_heads.box_predictor.cls_score.weight"], d2["roi_heads.box_predictor.cls_score.bias"]
    tw, tb = tv["roi_heads.box_predictor.cls_score.weight"], tv["roi_heads.box_predictor.cls_score.bias"]
    assert w.shape == tw.shape  # K + 1 rows in both
    for k in range(K):  # Detectron2 class k is torchvision label k + 1
        assert torch.equal(w[k], tw[k + 1]) and torch.equal(b[k], tb[k + 1])
    assert torch.equal(w[K], tw[0]) and torch.equal(b[K], tb[0])  # background last
    box = d2["roi_heads.box_predictor.bbox_pred.weight"]
    tbox = tv["roi_heads.box_predictor.bbox_pred.weight"]
    assert box.shape[0] == 4 * K and tbox.shape[0] == 4 * (K + 1)
    for k in range(K):
        assert torch.equal(box[4 * k:4 * k + 4], tbox[4 * (k + 1):4 * (k + 2)])
    mask = d2["roi_heads.mask_head.predictor.weight"]
    assert mask.shape[0] == K
    assert torch.equal(mask, tv["roi_heads.mask_predictor.mask_fcn_logits.weight"][1:])
    # what each framework computes from the same box features: equal per-class probabilities
    x = torch.randn(5, 64)
    tv_probs = F.softmax(det.roi_heads.box_predictor.cls_score(x), -1)
    d2_probs = F.softmax(F.linear(x, w, b), -1)
    assert torch.allclose(d2_probs[:, :K], tv_probs[:, 1:], atol=1e-6)
    tv_deltas = det.roi_heads.box_predictor.bbox_pred(x).view(5, K + 1, 4)[:, 1:]
    d2_deltas = F.linear(x, box, d2["roi_heads.box_predictor.bbox_pred.bias"]).view(5, K, 4)
    assert torch.allclose(d2_deltas, tv_deltas, atol=1e-6)


def d2_cell_anchors(sizes, ratios):
    """Detectron2's cell anchors (its documented rule): sizes outer loop, h / w = ratio."""
    out = []
    for size in sizes:
        for ratio in ratios:
            w = math.sqrt(size * size / ratio)
            out.append((w, ratio * w))
    return torch.tensor(out)


def test_retinanet_head_follows_detectron2_anchor_and_class_layout():
    det = detector("retinanet")
    gen = det.anchor_generator
    sizes, ratios = gen.sizes[0], gen.aspect_ratios[0]
    A = len(sizes) * len(ratios)
    tv_cell = gen.cell_anchors[0]
    tv_wh = tv_cell[:, 2:] - tv_cell[:, :2]
    d2_wh = d2_cell_anchors(sizes, ratios)
    d2 = {k: torch.from_numpy(v) for k, v in detectron2_state_dict(det).items()}
    feat = torch.randn(1, 32, 4, 5)
    head = det.head
    tv_cls = head.classification_head.cls_logits(head.classification_head.conv(feat)).view(1, A, K + 1, 4, 5)
    tv_box = head.regression_head.bbox_reg(head.regression_head.conv(feat)).view(1, A, 4, 4, 5)
    h = feat
    for i in range(len(head.classification_head.conv)):
        h = F.relu(F.conv2d(h, d2[f"head.cls_subnet.{2 * i}.weight"], d2[f"head.cls_subnet.{2 * i}.bias"], padding=1))
    d2_cls = F.conv2d(h, d2["head.cls_score.weight"], d2["head.cls_score.bias"], padding=1).view(1, A, K, 4, 5)
    h = feat
    for i in range(len(head.regression_head.conv)):
        h = F.relu(F.conv2d(h, d2[f"head.bbox_subnet.{2 * i}.weight"], d2[f"head.bbox_subnet.{2 * i}.bias"], padding=1))
    d2_box = F.conv2d(h, d2["head.bbox_pred.weight"], d2["head.bbox_pred.bias"], padding=1).view(1, A, 4, 4, 5)
    assert d2["head.cls_score.weight"].shape[0] == A * K  # no background logit
    for j in range(A):
        # the torchvision anchor slot with Detectron2 slot j's shape (torchvision rounds to pixels)
        i = int(((tv_wh - d2_wh[j]).abs().sum(1)).argmin())
        assert (tv_wh[i] - d2_wh[j]).abs().max() <= 1.0
        assert torch.allclose(d2_cls[:, j], tv_cls[:, i, 1:], atol=1e-5)
        assert torch.allclose(d2_box[:, j], tv_box[:, i], atol=1e-5)


@pytest.mark.parametrize("arch", ["mask_rcnn", "retinanet"])
def test_config_fragment_reproduces_torchvision_inference(arch, tmp_path):
    cfg = DetectorConfig(arch=arch, **TINY, detections_per_image=300, score_thresh=0.2, min_size=96, max_size=128,
                         rpn_pre_nms_top_n_test=111, rpn_post_nms_top_n_test=77)
    det = build_detector(cfg, K)
    frag = detectron2_config(cfg, K, det, weights="w.pkl")
    path = write_detectron2_config(frag, tmp_path / "d2.yaml", ["a", "b", "c"])
    text = path.read_text()
    assert "a, b, c" in text
    assert "register TorchvisionAnchorGenerator" in text and "cv2.imread(path)" in text  # BGR, as cv2 reads
    loaded = yaml.safe_load(text)
    m = loaded["MODEL"]
    assert loaded["VERSION"] == 2  # else merge_from_file guesses the version and warns
    assert m["ANCHOR_GENERATOR"]["NAME"] == "TorchvisionAnchorGenerator" and m["ANCHOR_GENERATOR"]["OFFSET"] == 0.0
    assert loaded["INPUT"] == {"FORMAT": "RGB", "MIN_SIZE_TEST": 96, "MAX_SIZE_TEST": 128}
    assert m["PIXEL_MEAN"] == [123.675, 116.28, 103.53] and m["PIXEL_STD"] == [58.395, 57.12, 57.375]
    assert m["RESNETS"]["STRIDE_IN_1X1"] is False and m["RESNETS"]["DEPTH"] == 18
    assert m["RESNETS"]["RES2_OUT_CHANNELS"] == 64 and m["FPN"]["OUT_CHANNELS"] == 32
    assert loaded["TEST"]["DETECTIONS_PER_IMAGE"] == 300
    assert m["WEIGHTS"] == "w.pkl"
    if arch == "retinanet":
        assert m["RETINANET"]["NUM_CLASSES"] == K and m["RETINANET"]["SCORE_THRESH_TEST"] == pytest.approx(0.2)
        assert m["ANCHOR_GENERATOR"]["SIZES"][0] == [32, 40, 50]
        assert m["RESNETS"]["OUT_FEATURES"] == ["res3", "res4", "res5"]
    else:
        assert m["ROI_HEADS"]["NUM_CLASSES"] == K and m["ROI_HEADS"]["SCORE_THRESH_TEST"] == pytest.approx(0.2)
        assert m["RPN"]["PRE_NMS_TOPK_TEST"] == 111 and m["RPN"]["POST_NMS_TOPK_TEST"] == 77
        assert m["ROI_BOX_HEAD"]["POOLER_TYPE"] == "ROIAlign"  # aligned=False, as torchvision
        assert m["ROI_BOX_HEAD"]["POOLER_SAMPLING_RATIO"] == 2 and m["ROI_MASK_HEAD"]["POOLER_RESOLUTION"] == 14
        assert m["MASK_ON"] is True and m["ANCHOR_GENERATOR"]["SIZES"] == [[32], [64], [128], [256], [512]]


def test_readme_registrations_block_is_python_and_registers_what_the_fragment_names():
    """The agreement check execs this block in Detectron2; here (no Detectron2) it must at least
    compile and define both names the fragments refer to."""
    import ast
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("agreement", root / "benchmarks" / "detectron2_agreement.py")
    agreement = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(agreement)
    block = agreement.readme_registrations(root / "README.md")
    defined = {n.name for n in ast.parse(block).body if isinstance(n, (ast.ClassDef, ast.FunctionDef))}
    assert {"TorchvisionAnchorGenerator", "build_retinanet_resnet_fpn_p5_backbone"} <= defined
    assert agreement.box_iou([0, 0, 10, 10], [0, 0, 10, 5]) == pytest.approx(0.5)
