"""bf16 autocast keeps box geometry float32 (CPU autocast, the same code path as CUDA's).

bf16 keeps 8 significant bits: between 512 and 1024 px its grid is 4 px. Anchors built, and
boxes decoded, in the feature dtype would land on it; these tests pin that they do not, and
that a bf16 run still learns like a float32 one.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import (
    CPU_FINETUNE_CONFIG,
    tiny_finetune_overrides,
    tiny_model,
    tiny_pretrain_config,
    two_view_batch,
)
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList

from predet.config.finetune import DetectorConfig
from predet.engine.metrics import read_metrics
from predet.modeling.detectors import build_detector
from predet.pretrain import pretrain

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)
SIZE = 800


def maps_800(dtype, channels=8):
    """FPN-shaped maps of an 800 px view (strides 4..64), as autocast hands them on."""
    return {str(i): torch.zeros(1, channels, SIZE // 2 ** (i + 2), SIZE // 2 ** (i + 2), dtype=dtype)
            for i in range(5)}


def test_predet_anchors_at_800_px_are_float32_and_equal_under_bf16():
    model = tiny_model(anchor_sizes=[32, 64, 128, 256, 512])
    view = torch.zeros(1, 3, SIZE, SIZE, dtype=torch.uint8)
    exact = model.anchors(view, maps_800(torch.float32))
    with torch.autocast(**BF16):
        under_amp = model.anchors(view, maps_800(torch.bfloat16))
    assert under_amp.dtype == torch.float32 and torch.equal(under_amp, exact)
    # what torchvision's own generator does with bf16 maps: anchors off by pixels
    plain = AnchorGenerator(tuple((s,) for s in [32, 64, 128, 256, 512]), ((0.5, 1.0, 2.0),) * 5)
    images = ImageList(view.float(), [(SIZE, SIZE)])
    naive = plain(images, list(maps_800(torch.bfloat16).values()))[0]
    assert naive.dtype == torch.bfloat16 and (naive.float() - exact).abs().max() >= 1.0


@pytest.mark.parametrize("arch", ["mask_rcnn", "retinanet"])
def test_detector_anchors_and_box_coding_are_float32_under_bf16(arch):
    detector = build_detector(DetectorConfig(arch=arch, backbone="resnet18", fpn_channels=8), num_classes=3)
    generator = detector.rpn.anchor_generator if arch == "mask_rcnn" else detector.anchor_generator
    coder = detector.rpn.box_coder if arch == "mask_rcnn" else detector.box_coder
    images = ImageList(torch.zeros(1, 3, SIZE, SIZE), [(SIZE, SIZE)])
    maps = list(maps_800(torch.float32).values())
    exact = generator(images, maps)[0]
    with torch.autocast(**BF16):
        anchors = generator(images, [m.bfloat16() for m in maps])[0]
        deltas = (torch.randn(len(anchors), 4) * 0.1).bfloat16()
        boxes = coder.decode_single(deltas, anchors)
    assert anchors.dtype == boxes.dtype == torch.float32 and torch.equal(anchors, exact)
    torch.testing.assert_close(boxes, BoxCoder((1.0, 1.0, 1.0, 1.0)).decode_single(deltas.float(), exact))


def test_detector_box_outputs_are_float32_under_bf16():
    detector = build_detector(DetectorConfig(backbone="resnet18", fpn_channels=16, box_head_dim=32), num_classes=3)
    with torch.autocast(**BF16):
        logits, deltas = detector.rpn.head([torch.randn(1, 16, 20, 20)])
        scores, box_deltas = detector.roi_heads.box_predictor(torch.randn(5, 32))
    assert {t.dtype for t in (*logits, *deltas, scores, box_deltas)} == {torch.float32}
    # the state dict keeps torchvision's names (transfer and export see the same model)
    assert "rpn.head.cls_logits.weight" in detector.state_dict()
    assert "roi_heads.box_predictor.bbox_pred.weight" in detector.state_dict()


def test_crpn_proposals_under_bf16_equal_float32_ones():
    """Given the trunk features autocast produced, the proposals decoded under autocast are the
    float32 computation's, bit for bit (float32 scores, deltas, decoding and NMS)."""
    torch.manual_seed(0)
    model = tiny_model().eval()
    batch = two_view_batch(n=2, size=64, q=4)
    with torch.no_grad(), torch.autocast(**BF16):
        _, fpn = model.features(batch["view1"], batch["view2"])
        fpn1, fpn2 = model.split_views(fpn, 2)
        z = model.embed_boxes(fpn1, batch["b1"], (64, 64))
        trunk = model.crpn.trunk_features(list(fpn2.values()))
        sw, sb, dw, db = model.crpn.dynamic_weights(z.view(2, -1, z.shape[-1]))
        scores = model.crpn.scores(trunk, sw, sb)
        anchors = model.anchors(batch["view2"], fpn2)
        boxes, valid = model.proposals(trunk, dw, db, scores, anchors, (64, 64), 8)
    assert trunk.dtype == dw.dtype == torch.bfloat16  # the compute stays in bf16 ...
    assert scores.dtype == torch.float32 and boxes.dtype == torch.float32  # ... the geometry does not
    with torch.no_grad():
        scores32 = model.crpn.scores(trunk.float(), sw.float(), sb.float())
        boxes32, valid32 = model.proposals(trunk.float(), dw.float(), db.float(), scores32, anchors, (64, 64), 8)
    assert torch.equal(scores, scores32)
    assert torch.equal(valid, valid32) and torch.equal(boxes, boxes32)


def test_contrastive_logits_and_box_losses_are_float32_under_bf16():
    torch.manual_seed(0)
    model = tiny_model()
    batch = two_view_batch(n=2, size=64, q=4)
    seen = {}
    real = model.roi_head.similarity
    model.roi_head.similarity = lambda a, b: seen.setdefault("sim", real(a, b))
    with torch.autocast(**BF16):
        out = model(batch)
    assert seen["sim"].dtype == torch.float32
    for key in ("loss_cls", "loss_crpn_score", "loss_crpn_reg", "loss_nce", "loss_roi_reg"):
        assert out[key].dtype == torch.float32 and torch.isfinite(out[key]), key


def _losses(run_dir):
    return [sum(v for k, v in r["losses"].items() if k.startswith("loss"))
            for r in read_metrics(run_dir / "metrics.jsonl") if "losses" in r]


def _heldout_losses(cfg, state, vocab_size, heldout, batches=12, batch_size=4):
    """Each loss of ``state`` on fixed held-out two-view batches (float32, the same views and
    sampling draws for every model): training losses are one noisy batch each, and their
    20-step medians are too coarse to say whether a 40-step run learned."""
    from predet.data.build import heldout_dataset
    from predet.data.samplers import DeterministicBatchSampler
    from predet.data.views import TwoViewTransform, collate_two_view
    from predet.data.weak import Vocabulary
    from predet.pretrain import build_pretrain_model

    vocab = Vocabulary.load_json(cfg.data.vocab)
    data = heldout_dataset(heldout, vocab, TwoViewTransform(cfg.data.views), 10**6)
    sampler = DeterministicBatchSampler(len(data), batch_size, seed=123)
    model = build_pretrain_model(cfg, vocab_size)
    if state is not None:
        model.load_state_dict(state)
    model.train()  # the losses are the training graph's; BN uses each batch's statistics
    totals = {}
    with torch.no_grad():
        for i in range(batches):
            torch.manual_seed(i)  # the RoI sampling draws
            out = model(collate_two_view([data[k] for k in sampler.batch(i)], colour_in_loader=True))
            for k, v in out.items():
                if k.startswith("loss"):
                    totals[k] = totals.get(k, 0.0) + float(v) / batches
    return totals


def test_bf16_pretraining_learns_as_float32_does(fashiondet_tiny, tmp_path):
    """The shipped CPU recipe, shrunk, trained in float32 and under CPU bf16 autocast from the same
    seed, then scored in float32 on fixed held-out batches: both learn the pretext (CRPN scores
    and InfoNCE well below the untrained model's), and bf16 gets most of float32's gain.

    The tiny classification does not learn in 40 steps of batch 4 (its held-out loss rises in
    float32 as well), so it is not part of the comparison."""
    from predet.checkpoint.io import load_checkpoint

    weak = fashiondet_tiny / "weak"
    finals = {}
    for amp in ("none", "bf16"):
        cfg = tiny_pretrain_config(weak, tmp_path / amp, 40, **{
            "solver.amp": amp, "solver.lr": 0.02, "data.views.size": 32, "data.views.min_query_px": 4,
            "train.batch_size": 4, "data.views.jitter": 0.0})
        assert pretrain(cfg).iteration == 40
        finals[amp] = load_checkpoint(tmp_path / amp / "checkpoints" / "model_final.pth")
    vocab_size = len(finals["none"]["extra_state"]["vocab"])
    heldout = weak / "heldout_clean.jsonl"
    scores = {name: _heldout_losses(cfg, None if name == "init" else finals[name]["model"], vocab_size, heldout)
              for name in ("init", "none", "bf16")}
    for key, least_gain in (("loss_crpn_score", 0.3), ("loss_nce", 0.3)):
        gain = {amp: scores["init"][key] - scores[amp][key] for amp in ("none", "bf16")}
        assert gain["none"] > least_gain, (key, scores)  # float32 learns ...
        assert gain["bf16"] > 0.5 * gain["none"], (key, scores)  # ... and bf16 gets most of it


def test_bf16_finetuning_trains_and_evaluates(fashiondet_tiny, tmp_path):
    from predet.finetune import finetune, load_finetune_config

    curves = {}
    for amp in ("none", "bf16"):
        cfg = load_finetune_config(CPU_FINETUNE_CONFIG, tiny_finetune_overrides(
            fashiondet_tiny, tmp_path / amp, "scratch", 6, **{"solver.amp": amp, "model.min_size": 64,
                                                             "model.max_size": 64}))
        result = finetune(cfg)
        assert result.train.iteration == 6
        curves[amp] = _losses(tmp_path / amp)
    assert curves["bf16"][-1] < curves["bf16"][0], curves
    gap = max(abs(a - b) / a for a, b in zip(curves["none"], curves["bf16"]))
    assert gap < 0.05, curves
    saved = json.loads((tmp_path / "bf16" / "results.json").read_text())
    assert saved["solver"]["amp"] == "bf16" and saved["val"]["bbox/AP"] >= 0  # evaluated in float32


def test_bfloat16_heads_multiply_in_bf16_and_keep_float32_parameters_and_outputs():
    """model.head_dtype=bfloat16: the box head and the CRPN trunk round their products' inputs to
    bf16 (the float32 run's numbers to bf16 precision), everything else is the float32 model:
    the same state dict, float32 outputs, and the same numbers under autocast."""
    from predet.modeling.precision import Bfloat16Conv2d, Bfloat16Linear

    torch.manual_seed(0)
    exact = tiny_model()
    fast = tiny_model(head_dtype="bfloat16")
    fast.load_state_dict(exact.state_dict())
    assert exact.state_dict().keys() == fast.state_dict().keys()  # transfer and export see the same model
    assert isinstance(fast.box_head.fc6, Bfloat16Linear) and isinstance(fast.box_head.fc7, Bfloat16Linear)
    assert isinstance(fast.crpn.trunk[0][0], Bfloat16Conv2d)
    assert all(p.dtype == torch.float32 for p in fast.parameters())

    pooled = torch.randn(6, 7, 7, 32).permute(0, 3, 1, 2)  # the CPU pooler's channels-last layout
    maps = [torch.randn(2, 32, s, s) for s in (16, 8)]
    with torch.no_grad():
        for layout in (pooled, pooled.contiguous()):  # the channels-last path and the plain one
            a, b = exact.box_head(layout), fast.box_head(layout)
            assert b.dtype == torch.float32 and not torch.equal(a, b)  # really rounded ...
            torch.testing.assert_close(b, a, rtol=0.02, atol=0.02 * float(a.abs().max()))  # ... to bf16's precision
        a, b = exact.crpn.trunk_features(maps), fast.crpn.trunk_features(maps)
        assert b.dtype == torch.float32 and not torch.equal(a, b)
        torch.testing.assert_close(b, a, rtol=0.02, atol=0.02 * float(a.abs().max()))
        with torch.autocast(**BF16):  # under autocast, autocast decides: the same numbers as the plain model
            assert torch.equal(exact.box_head(pooled), fast.box_head(pooled))
            assert torch.equal(exact.crpn.trunk_features(maps), fast.crpn.trunk_features(maps))


def test_bfloat16_heads_give_float32_s_gradients_to_bf16_precision():
    torch.manual_seed(0)
    exact = tiny_model()
    fast = tiny_model(head_dtype="bfloat16")
    fast.load_state_dict(exact.state_dict())
    batch = two_view_batch(n=2, size=64, q=4)
    grads = {}
    for name, model in (("exact", exact), ("fast", fast)):
        torch.manual_seed(1)  # the same RoI sampling draws
        out = model(batch)
        model.zero_grad()
        sum(v for k, v in out.items() if k.startswith("loss")).backward()
        grads[name] = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    assert grads["exact"].keys() == grads["fast"].keys()
    for key in ("box_head.fc6.weight", "crpn.trunk.0.0.weight", "backbone.body.layer1.0.conv1.weight"):
        a, b = grads["exact"][key], grads["fast"][key]
        cosine = float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))
        assert cosine > 0.98, (key, cosine)
