"""Transfer of PreDet / external weights into detectors, exports, and refusal of code in pickles."""

from __future__ import annotations

import json
import os
import pickle
import sys

import numpy as np
import pytest
import torch
import torchvision
from safetensors.torch import load_file

from predet.checkpoint.export import (
    detectron2_state_dict,
    export_detectron2,
    export_pretrained,
    export_torchvision,
)
from predet.checkpoint.formats import RestrictedUnpickler, load_pickle_weights
from predet.checkpoint.renames import c2_to_detectron2, from_detectron2, to_detectron2
from predet.checkpoint.transfer import LoadReport, load_init_weights
from predet.config.finetune import DetectorConfig
from predet.config.pretrain import ModelConfig
from predet.modeling.detectors import build_detector
from predet.modeling.predet.meta_arch import PreDet

TINY = dict(backbone="resnet18", fpn_channels=32, box_head_dim=64)
K = 3  # foreground classes


def tiny_detector(arch: str, seed: int = 1, **kw):
    torch.manual_seed(seed)
    return build_detector(DetectorConfig(arch=arch, mask_head_dim=16, **{**TINY, **kw}), K)


@pytest.fixture(scope="module")
def predet_ckpt(tmp_path_factory):
    """A tiny PreDet pre-training checkpoint with non-trivial BN statistics."""
    torch.manual_seed(0)
    model = PreDet(5, ModelConfig(crpn_hidden=16, proj_dim=8, **TINY))
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith(("running_mean", "running_var")):
                buf.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("ckpt") / "model_final.pth"
    torch.save({"model": model.state_dict(), "extra_state": {"vocab": list("abcde"), "kind": "predet_pretrain"},
                "config": {"model": dict(TINY)}}, path)
    return path, {k: v.clone() for k, v in model.state_dict().items()}


def snapshot(detector) -> dict:
    return {k: v.clone() for k, v in detector.state_dict().items()}


def expected_two_stage(src: dict) -> dict:
    """Detector key -> PreDet tensor for everything that must transfer into Mask/Faster R-CNN."""
    out = {}
    for key, value in src.items():
        if key.endswith("num_batches_tracked"):
            continue
        if key.startswith("backbone."):
            out[key] = value
        elif key.startswith("crpn.trunk."):
            out["rpn.head.conv." + key[len("crpn.trunk."):]] = value
        elif key.startswith("box_head."):
            out["roi_heads.box_head." + key[len("box_head."):]] = value
    return out


@pytest.mark.parametrize("arch", ["mask_rcnn", "faster_rcnn"])
def test_predet_transfers_into_two_stage_detector(predet_ckpt, arch):
    path, src = predet_ckpt
    det = tiny_detector(arch)
    before = snapshot(det)
    report = load_init_weights(det, str(path), arch)
    after = det.state_dict()
    expected = expected_two_stage(src)
    assert set(report.loaded) == set(expected)
    for key, value in expected.items():
        assert torch.equal(after[key], value), key
    fresh = [k for k in after if k not in expected and not k.endswith("num_batches_tracked")]
    assert set(report.missing) == set(fresh)
    assert any(k.startswith("roi_heads.box_predictor.") for k in fresh)
    assert {"rpn.head.cls_logits.weight", "rpn.head.bbox_pred.weight"} <= set(fresh)
    if arch == "mask_rcnn":
        assert any(k.startswith("roi_heads.mask_head.") for k in fresh)
        assert any(k.startswith("roi_heads.mask_predictor.") for k in fresh)
    for key in fresh:
        assert torch.equal(after[key], before[key]), key
    reasons = dict(report.skipped)
    assert reasons["cls_head.fc.weight"] == "not transferred (class-specific)"
    assert reasons["crpn.score_generator.0.weight"].startswith("not transferred")
    assert reasons["roi_head.projection.0.weight"].startswith("not transferred")
    table = report.table()
    assert "backbone.body" in table and "missing" in table and "roi_heads.box_predictor" in table
    assert report.to_dict()["loaded"] == report.loaded


def test_predet_transfers_into_retinanet_with_level_shift(predet_ckpt):
    path, src = predet_ckpt
    det = tiny_detector("retinanet")
    before = snapshot(det)
    report = load_init_weights(det, str(path), "retinanet")
    after = det.state_dict()
    for key, value in src.items():
        if key.startswith("backbone.body.") and not key.endswith("num_batches_tracked"):
            assert torch.equal(after[key], value), key
    for i in range(3):  # RetinaNet FPN input i is C(i+3) = PreDet's FPN input i+1
        for block in ("inner_blocks", "layer_blocks"):
            for p in ("weight", "bias"):
                assert torch.equal(after[f"backbone.fpn.{block}.{i}.0.{p}"], src[f"backbone.fpn.{block}.{i + 1}.0.{p}"])
    untouched = [k for k in after if k.startswith(("backbone.fpn.extra_blocks.", "head."))]
    assert untouched and set(untouched) <= set(report.missing)
    for key in untouched:
        assert torch.equal(after[key], before[key]), key
    reasons = dict(report.skipped)
    assert reasons["backbone.fpn.inner_blocks.0.0.weight"] == "no counterpart"  # C2 lateral
    assert reasons["crpn.trunk.0.0.weight"] == "no counterpart"


def test_nothing_loaded_names_the_file(tmp_path):
    path = tmp_path / "unrelated.pth"
    torch.save({"model": {"backbone.body.conv1.weight": torch.zeros(1, 1, 1, 1)},
                "extra_state": {"kind": "predet_pretrain"}}, path)
    with pytest.raises(ValueError, match="unrelated.pth"):
        load_init_weights(tiny_detector("faster_rcnn"), str(path), "faster_rcnn")
    junk = tmp_path / "junk.pth"
    torch.save({"foo.bar": torch.zeros(2)}, junk)
    with pytest.raises(ValueError, match="junk.pth"):
        load_init_weights(tiny_detector("faster_rcnn"), str(junk), "faster_rcnn")


def test_shape_mismatch_is_skipped(predet_ckpt):
    path, src = predet_ckpt
    det = tiny_detector("mask_rcnn", fpn_channels=16, box_head_dim=32)
    report = load_init_weights(det, str(path), "mask_rcnn")
    reasons = dict(report.skipped)
    assert reasons["backbone.fpn.inner_blocks.0.0.weight"] == "shape mismatch (32, 64, 1, 1) vs (16, 64, 1, 1)"
    assert reasons["box_head.fc6.weight"].startswith("shape mismatch")
    assert "backbone.fpn.inner_blocks.0.0.weight" in report.missing
    assert torch.equal(det.state_dict()["backbone.body.conv1.weight"], src["backbone.body.conv1.weight"])


def test_scratch_loads_nothing():
    det = tiny_detector("faster_rcnn")
    before = snapshot(det)
    report = load_init_weights(det, "scratch", "faster_rcnn")
    assert report.loaded == [] and report.missing and "nothing loaded" in report.table()
    assert all(torch.equal(v, before[k]) for k, v in det.state_dict().items())
    with pytest.raises(FileNotFoundError, match="no_such.pth"):
        load_init_weights(det, "no_such.pth", "faster_rcnn")


def _check_body(det, src: dict):
    body = det.state_dict()
    n = 0
    for key, value in src.items():
        if key.startswith("fc.") or key.endswith("num_batches_tracked"):
            continue
        assert torch.equal(body["backbone.body." + key], value), key
        n += 1
    return n


@pytest.mark.parametrize("prefix", ["", "module.encoder.", "module.encoder_q."])
def test_torchvision_resnet_file(tmp_path, prefix):
    torch.manual_seed(3)
    src = torchvision.models.resnet18().state_dict()
    wrapped = {prefix + k: v for k, v in src.items()}
    if prefix == "module.encoder_q.":  # MoCo: the key encoder and queue ride along
        wrapped.update({"module.encoder_k.conv1.weight": src["conv1.weight"], "module.queue": torch.zeros(4, 2)})
    path = tmp_path / "r18.pth"
    torch.save({"state_dict": wrapped} if prefix else wrapped, path)
    det = tiny_detector("mask_rcnn")
    report = load_init_weights(det, str(path), "mask_rcnn")
    assert _check_body(det, src) == len(report.loaded)
    assert all(k.startswith("backbone.body.") for k in report.loaded)
    assert dict(report.skipped)[prefix + "fc.weight"] == "not transferred (class-specific)"


def test_safetensors_backbone_file(tmp_path):
    from safetensors.torch import save_file

    src = torchvision.models.resnet18().state_dict()
    path = tmp_path / "r18.safetensors"
    save_file({"model." + k: v.contiguous() for k, v in src.items()}, str(path))
    det = tiny_detector("retinanet")
    load_init_weights(det, str(path), "retinanet")
    assert _check_body(det, src) > 0


def _transferred(key: str) -> bool:
    return key.startswith(("backbone.", "rpn.head.conv.", "roi_heads.box_head."))


def test_detectron2_pkl_round_trip(tmp_path):
    src_det = tiny_detector("mask_rcnn", seed=5)
    with torch.no_grad():
        for name, buf in src_det.named_buffers():
            if name.endswith("running_var"):
                buf.uniform_(0.5, 1.5)
    path = export_detectron2(src_det, tmp_path / "d2.pkl")
    data = load_pickle_weights(path)
    assert data["__author__"] == "predet" and data["matching_heuristics"] is False
    det = tiny_detector("mask_rcnn", seed=6)
    report = load_init_weights(det, str(path), "mask_rcnn")
    src, after = src_det.state_dict(), det.state_dict()
    expected = {k for k in src if _transferred(k) and not k.endswith("num_batches_tracked")}
    assert set(report.loaded) == expected
    for key in expected:
        assert torch.equal(after[key], src[key]), key
    assert dict(report.skipped)["roi_heads.box_predictor.cls_score.weight"] == "not transferred (class-specific)"
    cls = "roi_heads.box_predictor.cls_score.weight"
    assert not torch.equal(after[cls], src[cls])
    # the same weights as a Detectron2 .pth (tensors, torch format) load the same way
    pth = tmp_path / "d2.pth"
    torch.save({"model": {k: torch.from_numpy(v) for k, v in data["model"].items()}}, pth)
    det2 = tiny_detector("mask_rcnn", seed=7)
    # no __author__: the file does not say which input it expects, so the user does
    assert set(load_init_weights(det2, str(pth), "mask_rcnn", input_format="RGB").loaded) == expected
    # and into RetinaNet: the body and the C3..C5 FPN levels
    ret = tiny_detector("retinanet")
    load_init_weights(ret, str(path), "retinanet")
    c3 = ret.state_dict()["backbone.fpn.inner_blocks.0.0.weight"]
    assert torch.equal(c3, src["backbone.fpn.inner_blocks.1.0.weight"])


def test_caffe2_resnet_names(tmp_path):
    assert c2_to_detectron2("res2_0_branch2a_w") == "backbone.bottom_up.res2.0.conv1.weight"
    assert c2_to_detectron2("res_conv1_bn_s") == "backbone.bottom_up.stem.conv1.norm.weight"
    assert c2_to_detectron2("res5_0_branch1_bn_b") == "backbone.bottom_up.res5.0.shortcut.norm.bias"
    det = tiny_detector("faster_rcnn")
    blobs = {"conv1_w": np.ones((64, 3, 7, 7), np.float32), "res_conv1_bn_s": np.full(64, 2.0, np.float32),
             "res_conv1_bn_b": np.full(64, 0.5, np.float32), "fc1000_w": np.zeros((1000, 512), np.float32)}
    path = tmp_path / "R-18.pkl"
    with open(path, "wb") as f:
        pickle.dump({"blobs": blobs}, f, protocol=2)
    report = load_init_weights(det, str(path), "faster_rcnn")
    state = det.state_dict()
    assert torch.equal(state["backbone.body.bn1.weight"], torch.full((64,), 2.0))
    assert torch.equal(state["backbone.body.bn1.running_mean"], torch.zeros(64))
    assert torch.allclose(state["backbone.body.bn1.running_var"], torch.full((64,), 1 - 1e-5))
    assert "backbone.body.conv1.weight" in report.loaded
    assert dict(report.skipped)["fc1000_w"] == "not transferred (class-specific)"


TV_BUILDERS = {
    "mask_rcnn": torchvision.models.detection.maskrcnn_resnet50_fpn,
    "faster_rcnn": torchvision.models.detection.fasterrcnn_resnet50_fpn,
    "retinanet": torchvision.models.detection.retinanet_resnet50_fpn,
}


@pytest.mark.parametrize("arch", list(TV_BUILDERS))
def test_export_torchvision_loads_strictly(tmp_path, arch):
    det = build_detector(DetectorConfig(arch=arch, backbone="resnet50"), K)
    path = export_torchvision(det, tmp_path / "tv.safetensors", {"arch": arch, "steps": 3})
    tv = TV_BUILDERS[arch](weights=None, weights_backbone=None, num_classes=K + 1)
    state = load_file(str(path))
    tv.load_state_dict(state, strict=True)
    ours = det.state_dict()
    for key, value in tv.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(value, ours[key]), key


def test_detectron2_names(tmp_path):
    det = tiny_detector("mask_rcnn")
    names = detectron2_state_dict(det)
    for key in ("backbone.bottom_up.res2.0.conv1.weight", "backbone.bottom_up.res2.0.conv1.norm.running_mean",
                "backbone.bottom_up.stem.conv1.weight", "backbone.bottom_up.stem.conv1.norm.weight",
                "backbone.bottom_up.res3.0.shortcut.weight", "backbone.bottom_up.res3.0.shortcut.norm.bias",
                "backbone.fpn_lateral2.weight", "backbone.fpn_output5.weight",
                "proposal_generator.rpn_head.conv.weight", "proposal_generator.rpn_head.objectness_logits.weight",
                "proposal_generator.rpn_head.anchor_deltas.weight", "roi_heads.box_head.fc1.weight",
                "roi_heads.box_head.fc2.weight", "roi_heads.box_predictor.cls_score.weight",
                "roi_heads.box_predictor.bbox_pred.weight", "roi_heads.mask_head.mask_fcn1.weight",
                "roi_heads.mask_head.mask_fcn4.weight", "roi_heads.mask_head.deconv.weight",
                "roi_heads.mask_head.predictor.weight"):
        assert key in names, key
    counted = [k for k in det.state_dict() if not k.endswith("num_batches_tracked")]
    assert len(names) == len(counted)
    assert all(isinstance(v, np.ndarray) and v.flags.c_contiguous for v in names.values())
    ret = detectron2_state_dict(tiny_detector("retinanet"))
    assert {"backbone.fpn_lateral3.weight", "backbone.fpn_output5.weight", "backbone.top_block.p6.weight",
            "head.cls_subnet.0.weight", "head.cls_score.weight", "head.bbox_pred.weight"} <= set(ret)
    assert "backbone.fpn_lateral2.weight" not in ret


def test_one_table_both_ways():
    for arch in ("mask_rcnn", "retinanet"):
        for key in tiny_detector(arch).state_dict():
            d2 = to_detectron2(key, arch)
            assert d2 is not None, key
            assert from_detectron2(d2, arch) == key


def test_export_pretrained(predet_ckpt, tmp_path):
    path, src = predet_ckpt
    paths = export_pretrained(path, tmp_path / "out", arch="mask_rcnn")
    tv_path, meta_path, d2_path = paths
    assert tv_path.suffix == ".safetensors" and meta_path.suffix == ".json" and d2_path.suffix == ".pkl"
    meta = json.loads(meta_path.read_text())  # what a torchvision user needs to build the model
    assert (meta["backbone"], meta["fpn_channels"], meta["box_head_dim"]) == ("resnet18", 32, 64)
    tv = load_file(str(tv_path))
    expected = expected_two_stage(src)
    assert set(k for k in tv if not k.endswith("num_batches_tracked")) == set(expected)
    assert all(torch.equal(tv[k], v) for k, v in expected.items())
    d2 = load_pickle_weights(d2_path)["model"]
    assert set(d2) == {to_detectron2(k) for k in expected}
    assert np.array_equal(d2["proposal_generator.rpn_head.conv.weight"], src["crpn.trunk.0.0.weight"].numpy())
    # the partial torchvision file initialises a detector with only the heads left missing
    det = tiny_detector("mask_rcnn", seed=9)
    result = det.load_state_dict(tv, strict=False)
    assert not result.unexpected_keys
    assert all(not _transferred(k) for k in result.missing_keys)
    # RetinaNet export carries the level shift
    ret = export_pretrained(path, tmp_path / "ret", formats=("detectron2",), arch="retinanet")
    d2r = load_pickle_weights(ret[0])["model"]
    assert np.array_equal(d2r["backbone.fpn_lateral3.weight"], src["backbone.fpn.inner_blocks.1.0.weight"].numpy())
    assert "backbone.fpn_lateral2.weight" not in d2r


class Payload:
    """Pickles as a call that writes a marker file: what a malicious weight file does."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pkl_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {"backbone.bottom_up.stem.conv1.weight": Payload(marker)}, "__author__": "x"}, f)
    # the payload is live: plain pickle would run it
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(Payload(control)))
    assert control.exists()
    with pytest.raises(pickle.UnpicklingError, match=r"evil\.pkl.*(posix|os)\.system"):
        load_init_weights(tiny_detector("faster_rcnn"), str(path), "faster_rcnn")
    assert not marker.exists()


def test_malicious_pth_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"backbone.body.conv1.weight": Payload(marker)}}, path)
    with pytest.raises(pickle.UnpicklingError, match=r"evil\.pth"):
        load_init_weights(tiny_detector("faster_rcnn"), str(path), "faster_rcnn")
    assert not marker.exists()


def test_restricted_unpickler_refuses_other_globals(tmp_path):
    path = tmp_path / "w.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {"a": np.arange(3.0)}, "x": np.float32(1.5)}, f, protocol=5)
    data = load_pickle_weights(path)  # arrays, numpy scalars and protocol 5 are fine
    assert np.array_equal(data["model"]["a"], np.arange(3.0))
    with open(path, "wb") as f:
        pickle.dump({"f": sys.modules[__name__].snapshot}, f)
    with open(path, "rb") as f, pytest.raises(pickle.UnpicklingError, match="snapshot"):
        RestrictedUnpickler(f, path).load()


def test_report_to_dict_round_trips():
    report = LoadReport(source="x", format="detectron2", loaded=["a.b.weight"], skipped=[("c.d", "no counterpart")],
                        missing=["e.f.weight", "e.f.bias"])
    d = report.to_dict()
    assert d["skipped"] == [{"name": "c.d", "reason": "no counterpart"}]
    assert "e.f.{bias, weight}" in report.table()


@pytest.mark.parametrize("source,target", [("resnet50", "resnet18"), ("resnet18", "resnet34"), ("resnet101", "resnet50")])
def test_a_backbone_of_another_depth_is_refused_naming_both(tmp_path, source, target):
    # ResNet-50 weights once "loaded" 97 of a ResNet-18 detector's 120 trunk tensors and the run
    # went on as if pre-trained
    import torchvision

    from predet.checkpoint.transfer import load_init_weights
    from predet.config.finetune import DetectorConfig
    from predet.errors import CheckpointError
    from predet.modeling.detectors import build_detector

    path = tmp_path / f"{source}.pth"
    torch.save(getattr(torchvision.models, source)(weights=None).state_dict(), path)
    detector = build_detector(DetectorConfig(backbone=target, fpn_channels=16, box_head_dim=32, mask_head_dim=8), 3)
    names = {"resnet18": "ResNet-18 (basic blocks 2-2-2-2)", "resnet34": "ResNet-34 (basic blocks 3-4-6-3)",
             "resnet50": "ResNet-50 (bottleneck blocks 3-4-6-3)", "resnet101": "ResNet-101 (bottleneck blocks 3-4-23-3)"}
    with pytest.raises(CheckpointError, match="backbone does not match") as info:
        load_init_weights(detector, str(path), "mask_rcnn", input_format="RGB")
    message = str(info.value)
    assert names[source] in message and names[target] in message and "\n" not in message
    assert str(path) in message


def test_the_same_backbone_still_loads_whole(tmp_path):
    import torchvision

    from predet.checkpoint.transfer import load_init_weights
    from predet.config.finetune import DetectorConfig
    from predet.modeling.detectors import build_detector

    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    detector = build_detector(DetectorConfig(backbone="resnet18", fpn_channels=16, box_head_dim=32, mask_head_dim=8), 3)
    report = load_init_weights(detector, str(path), "mask_rcnn", input_format="RGB")
    assert not [k for k in report.missing if k.startswith("backbone.body.")]
