"""Detectron2 / Caffe2 weights keep computing what they were trained to: stride placement
(STRIDE_IN_1X1) is matched or asked for, BGR 0..255 stems are converted or the load refused."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from predet.checkpoint.export import detectron2_state_dict, export_detectron2
from predet.checkpoint.transfer import TV_MEAN, TV_STD, init_layout, load_init_weights
from predet.config import ConfigError
from predet.config.finetune import DetectorConfig
from predet.finetune import load_finetune_config, match_init_layout
from predet.modeling.detectors import build_detector, stride_in_1x1

R50 = dict(arch="faster_rcnn", backbone="resnet50", fpn_channels=32, box_head_dim=64)


def r50(stride: bool, seed: int = 0):
    torch.manual_seed(seed)
    det = build_detector(DetectorConfig(**R50, stride_in_1x1=stride), 2).eval()
    with torch.no_grad():
        for name, buf in det.named_buffers():
            if name.endswith("running_var"):
                buf.uniform_(0.5, 1.5)
            elif name.endswith("running_mean"):
                buf.uniform_(-0.2, 0.2)
    return det


def res5(det, x):
    return det.backbone.body(x)["3"]


@pytest.fixture(scope="module")
def d2_stride_weights(tmp_path_factory):
    """Detectron2-named weights of a STRIDE_IN_1X1 ResNet-50, with no author (a user's D2 .pkl)."""
    src = r50(True)
    path = tmp_path_factory.mktemp("d2") / "model_final.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": detectron2_state_dict(src)}, f)
    return src, path


def test_stride_in_1x1_is_asked_for_then_matched(d2_stride_weights):
    src, path = d2_stride_weights
    assert stride_in_1x1(src) is True and stride_in_1x1(r50(False)) is False
    with pytest.raises(ConfigError, match="init_stride_in_1x1=true"):
        load_init_weights(r50(False, seed=1), str(path), "faster_rcnn")
    with pytest.raises(ConfigError, match="model.stride_in_1x1=true"):
        load_init_weights(r50(False, seed=1), str(path), "faster_rcnn", stride_in_1x1="true", input_format="RGB")
    dst = r50(True, seed=1)
    load_init_weights(dst, str(path), "faster_rcnn", stride_in_1x1="true", input_format="RGB")
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        assert torch.allclose(res5(dst, x), res5(src, x), atol=1e-5)
        # what loading into torchvision's layout used to do silently: other res5 features
        wrong = r50(False, seed=1)
        load_init_weights(wrong, str(path), "faster_rcnn", stride_in_1x1="false", input_format="RGB")
        diff = (res5(wrong, x) - res5(src, x)).norm() / res5(src, x).norm()
    assert diff > 0.05


def test_finetune_builds_the_layout_the_weights_need(d2_stride_weights, tmp_path):
    src, _ = d2_stride_weights
    ours = export_detectron2(src, tmp_path / "ours.pkl")  # predet's export says how it downsamples
    assert init_layout(str(ours)).stride_in_1x1 is True
    cfg = load_finetune_config(None, [f"init={ours}", "model.backbone=resnet50"])
    assert match_init_layout(cfg).model.stride_in_1x1 is True
    unknown = load_finetune_config(None, [f"init={d2_stride_weights[1]}", "init_stride_in_1x1=true"])
    assert match_init_layout(unknown).model.stride_in_1x1 is True


def test_caffe2_bgr_stem_is_converted_to_torchvision_input(tmp_path):
    torch.manual_seed(0)
    ref = build_detector(DetectorConfig(arch="faster_rcnn", backbone="resnet18", fpn_channels=32,
                                        box_head_dim=64, freeze_at=0), 2).eval()
    w_rgb = ref.backbone.body.conv1.weight.detach()
    # the same conv for Caffe2's input: BGR channel order, pixels 0..255 minus the BGR mean
    std = torch.tensor(TV_STD).view(1, 3, 1, 1)
    w_c2 = (w_rgb / (255 * std)).flip(1)
    path = tmp_path / "R-18.pkl"
    with open(path, "wb") as f:
        pickle.dump({"blobs": {"conv1_w": w_c2.numpy(), "res_conv1_bn_s": np.ones(64, np.float32),
                               "res_conv1_bn_b": np.zeros(64, np.float32)}}, f, protocol=2)
    rgb = torch.rand(1, 3, 40, 48)
    bgr255 = (rgb * 255).flip(1) - torch.tensor([m * 255 for m in TV_MEAN]).flip(0).view(1, 3, 1, 1)
    normalised = (rgb - torch.tensor(TV_MEAN).view(1, 3, 1, 1)) / std
    caffe2_out = F.conv2d(bgr255, w_c2, stride=2, padding=3)
    assert torch.allclose(caffe2_out, F.conv2d(normalised, w_rgb, stride=2, padding=3), atol=1e-4)

    det = build_detector(DetectorConfig(arch="faster_rcnn", backbone="resnet18", fpn_channels=32,
                                        box_head_dim=64, freeze_at=0), 2)
    load_init_weights(det, str(path), "faster_rcnn")  # Caffe2 blobs: BGR 0..255, detected
    with torch.no_grad():
        assert torch.allclose(det.backbone.body.conv1(normalised), caffe2_out, atol=1e-4)
    raw = build_detector(DetectorConfig(arch="faster_rcnn", backbone="resnet18", fpn_channels=32,
                                        box_head_dim=64), 2)
    load_init_weights(raw, str(path), "faster_rcnn", input_format="RGB")  # the user says otherwise
    assert torch.equal(raw.backbone.body.conv1.weight, w_c2)


def test_detectron2_weights_without_an_input_format_are_refused(tmp_path):
    det = build_detector(DetectorConfig(arch="faster_rcnn", backbone="resnet18", fpn_channels=32,
                                        box_head_dim=64), 2)
    path = tmp_path / "d2.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": detectron2_state_dict(det)}, f)
    with pytest.raises(ConfigError, match="init_input_format=BGR"):
        load_init_weights(det, str(path), "faster_rcnn")
    with pytest.raises(ConfigError, match="init_stride_in_1x1"):
        init_layout(str(path), "maybe")
