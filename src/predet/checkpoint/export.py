"""Export detectors and PreDet checkpoints for other codebases (method.md §1, §2 "Transfer").

Two formats:

* torchvision: a ``.safetensors`` file whose keys are those of plain torchvision detectors
  (``maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=K + 1)`` loads a full
  detector export with ``strict=True``);
* Detectron2: the model-zoo ``.pkl`` layout ``{"model": {name: ndarray}, "__author__": ...}`` that
  ``DetectionCheckpointer`` reads, with names from the one table in
  :mod:`predet.checkpoint.renames` (``to_detectron2``), the same table the import uses.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pickle
from pathlib import Path

import numpy as np
import torch
from torch import nn

from predet.checkpoint.atomic import atomic_write
from predet.checkpoint.io import load_checkpoint
from predet.checkpoint.renames import infer_arch, to_detectron2
from predet.checkpoint.transfer import load_init_weights
from predet.config.finetune import DetectorConfig
from predet.engine.distributed import unwrap_model
from predet.engine.runfolder import check_writable, fresh_output
from predet.errors import CheckpointError
from predet.modeling.detectors import build_detector

FORMATS = ("torchvision", "detectron2")

logger = logging.getLogger(__name__)


def _state_dict(detector_or_state_dict) -> dict[str, torch.Tensor]:
    if isinstance(detector_or_state_dict, nn.Module):
        return unwrap_model(detector_or_state_dict).state_dict()
    return dict(detector_or_state_dict)


def add_num_batches_tracked(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Give every BN-like entry a zero ``num_batches_tracked``.

    FrozenBatchNorm2d has no counter, but plain torchvision built with ``weights=None`` uses
    ``nn.BatchNorm2d``, which does; without it ``load_state_dict(strict=True)`` fails.
    """
    out = dict(state)
    for key in state:
        if key.endswith(".running_mean"):
            counter = key[: -len("running_mean")] + "num_batches_tracked"
            out.setdefault(counter, torch.zeros((), dtype=torch.long))
    return out


def export_torchvision(detector_or_state_dict, out_path: str | Path, metadata: dict | None = None) -> Path:
    """Write torchvision-named weights as safetensors (contiguous CPU copies; tied tensors cloned)."""
    state = add_num_batches_tracked(_state_dict(detector_or_state_dict))
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    meta = {"format": "pt", "producer": "predet", "layout": "torchvision"}
    for key, value in (metadata or {}).items():
        meta[str(key)] = value if isinstance(value, str) else json.dumps(value)
    from safetensors.torch import save

    data = save(tensors, metadata=meta)
    return atomic_write(out_path, lambda f: f.write(data))


def anchor_layout(detector_or_cfg, arch: str) -> tuple[int, int]:
    """(anchor sizes per level, aspect ratios) of a detector, or of a DetectorConfig."""
    if isinstance(detector_or_cfg, nn.Module):
        model = unwrap_model(detector_or_cfg)
        gen = model.anchor_generator if arch == "retinanet" else model.rpn.anchor_generator
        return len(gen.sizes[0]), len(gen.aspect_ratios[0])
    cfg = detector_or_cfg or DetectorConfig()
    return (3 if arch == "retinanet" else 1), len(cfg.aspect_ratios)


def detectron2_anchor_order(sizes: int, ratios: int) -> list[int]:
    """For each Detectron2 anchor slot, the torchvision slot holding the same anchor.

    Detectron2 loops sizes then ratios (slot ``s * R + r``); torchvision's AnchorGenerator
    ratios then sizes (slot ``r * S + s``). With one size per level (RPN) they coincide.
    """
    return [r * sizes + s for s in range(sizes) for r in range(ratios)]


def _by_anchor(t: torch.Tensor, anchors: int, order: list[int], drop_first: bool = False) -> torch.Tensor:
    """Reorder the anchor blocks of a conv output (anchor-major channels); optionally drop the
    first entry of each block (torchvision's background logit)."""
    blocks = t.reshape(anchors, t.shape[0] // anchors, *t.shape[1:])[order]
    if drop_first:
        blocks = blocks[:, 1:]
    return blocks.reshape(-1, *t.shape[1:])


def detectron2_class_layout(name: str, t: torch.Tensor, anchors: tuple[int, int]) -> torch.Tensor:
    """One Detectron2-named tensor in Detectron2's class and anchor layout.

    * ``roi_heads.box_predictor.cls_score``: torchvision has background first, Detectron2 last;
    * ``roi_heads.box_predictor.bbox_pred``: torchvision keeps a (never used) background box
      regressor in its first 4 rows, Detectron2 has none;
    * ``roi_heads.mask_head.predictor``: torchvision's channel 0 is the background mask;
    * RetinaNet ``head.cls_score``: per anchor, torchvision's extra background logit goes, and
      anchors (like ``head.bbox_pred`` and the RPN outputs) take Detectron2's order.
    """
    order = detectron2_anchor_order(*anchors)
    n = anchors[0] * anchors[1]
    if name.startswith("roi_heads.box_predictor.cls_score."):
        return torch.cat([t[1:], t[:1]])
    if name.startswith("roi_heads.box_predictor.bbox_pred."):
        return t[4:]
    if name.startswith("roi_heads.mask_head.predictor."):
        return t[1:]
    if name.startswith("head.cls_score."):
        return _by_anchor(t, n, order, drop_first=True)
    if name.startswith(("head.bbox_pred.", "proposal_generator.rpn_head.")) and not name.startswith(
            "proposal_generator.rpn_head.conv."):
        return _by_anchor(t, n, order)
    return t


def detectron2_state_dict(detector_or_state_dict, arch: str | None = None,
                          anchors: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """Detectron2-named NumPy arrays in Detectron2's class layout; ``num_batches_tracked`` dropped.

    ``arch`` fixes the FPN level numbering (RetinaNet's FPN starts at C3); it is inferred from the
    keys when None. ``anchors`` is (sizes per level, aspect ratios), read from the detector when
    one is given, else the DetectorConfig defaults. Class-specific layers are converted by
    :func:`detectron2_class_layout`. Raises ValueError listing the tensors the table cannot name
    (e.g. a RegNet body, which Detectron2 names after pycls).
    """
    state = _state_dict(detector_or_state_dict)
    arch = arch or infer_arch(state)
    if anchors is None:
        is_module = isinstance(detector_or_state_dict, nn.Module)
        anchors = anchor_layout(detector_or_state_dict if is_module else None, arch)
    out, unnamed = {}, []
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        name = to_detectron2(key, arch)
        if name is None:
            unnamed.append(key)
            continue
        value = detectron2_class_layout(name, value.detach().to("cpu"), anchors)
        out[name] = np.ascontiguousarray(value.numpy())
    if unnamed:
        shown = ", ".join(unnamed[:5]) + (f" (+{len(unnamed) - 5} more)" if len(unnamed) > 5 else "")
        raise ValueError(
            f"no Detectron2 name for {len(unnamed)} tensors: {shown}; the Detectron2 export covers "
            "ResNet/ResNeXt backbones, FPN, RPN, box/mask heads and the RetinaNet head"
        )
    return out


def export_detectron2(detector_or_state_dict, out_path: str | Path, arch: str | None = None,
                      anchors: tuple[int, int] | None = None) -> Path:
    """Write Detectron2 model-zoo ``.pkl`` weights (BN as ``.norm.*``, exact names, no heuristics).

    Class-specific layers are in Detectron2's layout (see :func:`detectron2_class_layout`), so
    a fine-tuned detector predicts the same classes there. The arrays are pickled with protocol
    4 (NumPy >= 1.26.1 reads NumPy 2 array pickles).
    """
    from predet.modeling.detectors import stride_in_1x1

    is_module = isinstance(detector_or_state_dict, nn.Module)
    payload = {"model": detectron2_state_dict(detector_or_state_dict, arch, anchors), "__author__": "predet",
               "matching_heuristics": False,
               # how the ResNet downsamples, so an import back needs no question (None: not known)
               "stride_in_1x1": stride_in_1x1(detector_or_state_dict) if is_module else None}
    return atomic_write(out_path, lambda f: pickle.dump(payload, f, protocol=4))


# torchvision backbone -> Detectron2 RESNETS settings (ResNeXt: groups x width per group).
D2_RESNETS = {
    "resnet18": dict(DEPTH=18, RES2_OUT_CHANNELS=64), "resnet34": dict(DEPTH=34, RES2_OUT_CHANNELS=64),
    "resnet50": dict(DEPTH=50), "resnet101": dict(DEPTH=101),
    "resnext50_32x4d": dict(DEPTH=50, NUM_GROUPS=32, WIDTH_PER_GROUP=4),
    "resnext101_32x8d": dict(DEPTH=101, NUM_GROUPS=32, WIDTH_PER_GROUP=8),
}
D2_NORMS = {"frozen_bn": "FrozenBN", "bn": "BN", "syncbn": "SyncBN", "gn": "GN"}
# Detectron2 has no builder for RetinaNet's P6 computed from P5 (torchvision's layout); the
# README's "Moving to Detectron2" section registers this one in a few lines.
D2_RETINANET_P5_BACKBONE = "build_retinanet_resnet_fpn_p5_backbone"
# torchvision places each level's anchors at (padded image size // grid size) per side and rounds
# them to whole pixels; Detectron2's default generator uses the level's nominal stride (P6 of a
# 160-px image: 53 against 64) and unrounded anchors. The README's registered generator of this
# name does what torchvision does.
D2_TORCHVISION_ANCHORS = "TorchvisionAnchorGenerator"


def detectron2_config(cfg: DetectorConfig, num_classes: int, detector: nn.Module, weights: str = "") -> dict:
    """A Detectron2 config fragment (merge it into ``get_cfg()``) that runs the exported weights
    the way torchvision runs them: RGB input with torchvision's mean/std, stride in the 3x3
    conv, RoIAlign without the half-pixel shift (``ROIAlign``, not ``ROIAlignV2``) and
    torchvision's sampling ratio, the same anchors, proposal counts, thresholds and
    detections per image. Training-only settings are left to the user."""
    if cfg.backbone not in D2_RESNETS:
        raise ValueError(f"no Detectron2 config for backbone {cfg.backbone!r}; "
                         f"the Detectron2 export covers {', '.join(D2_RESNETS)}")
    model = unwrap_model(detector)
    retina = cfg.arch == "retinanet"
    mean = [round(float(m) * 255, 4) for m in model.transform.image_mean]
    std = [round(float(s) * 255, 4) for s in model.transform.image_std]
    first = 3 if retina else 2
    gen = model.anchor_generator if retina else model.rpn.anchor_generator
    norm = D2_NORMS[cfg.norm]
    d2_model = {
        "META_ARCHITECTURE": "RetinaNet" if retina else "GeneralizedRCNN",
        "WEIGHTS": weights, "MASK_ON": cfg.arch == "mask_rcnn",
        "PIXEL_MEAN": mean, "PIXEL_STD": std,
        "BACKBONE": {"NAME": D2_RETINANET_P5_BACKBONE if retina else "build_resnet_fpn_backbone",
                     "FREEZE_AT": cfg.freeze_at},
        "RESNETS": {"STRIDE_IN_1X1": cfg.stride_in_1x1, "NORM": norm, "OUT_FEATURES": [f"res{i}" for i in range(first, 6)],
                    **D2_RESNETS[cfg.backbone]},
        "FPN": {"IN_FEATURES": [f"res{i}" for i in range(first, 6)], "OUT_CHANNELS": cfg.fpn_channels,
                "NORM": "GN" if cfg.norm == "gn" else ""},
        "ANCHOR_GENERATOR": {"NAME": D2_TORCHVISION_ANCHORS, "SIZES": [[int(s) for s in level] for level in gen.sizes],
                             "ASPECT_RATIOS": [[float(r) for r in gen.aspect_ratios[0]]], "OFFSET": 0.0},
    }
    if retina:
        d2_model["RETINANET"] = {
            "NUM_CLASSES": num_classes, "IN_FEATURES": [f"p{i}" for i in range(3, 8)],
            "SCORE_THRESH_TEST": float(model.score_thresh), "NMS_THRESH_TEST": float(model.nms_thresh),
            "TOPK_CANDIDATES_TEST": int(model.topk_candidates), "NUM_CONVS": len(model.head.classification_head.conv),
            "BBOX_REG_WEIGHTS": [float(w) for w in model.box_coder.weights],
        }
        detections = int(model.detections_per_img)
    else:
        rpn, roi = model.rpn, model.roi_heads
        d2_model["RPN"] = {
            "IN_FEATURES": [f"p{i}" for i in range(2, 7)],
            "PRE_NMS_TOPK_TEST": rpn._pre_nms_top_n["testing"], "POST_NMS_TOPK_TEST": rpn._post_nms_top_n["testing"],
            "PRE_NMS_TOPK_TRAIN": rpn._pre_nms_top_n["training"], "POST_NMS_TOPK_TRAIN": rpn._post_nms_top_n["training"],
            "NMS_THRESH": float(rpn.nms_thresh), "BATCH_SIZE_PER_IMAGE": rpn.fg_bg_sampler.batch_size_per_image,
            "BBOX_REG_WEIGHTS": [float(w) for w in rpn.box_coder.weights],
        }
        d2_model["ROI_HEADS"] = {
            "NAME": "StandardROIHeads", "IN_FEATURES": [f"p{i}" for i in range(2, 6)], "NUM_CLASSES": num_classes,
            "SCORE_THRESH_TEST": float(roi.score_thresh), "NMS_THRESH_TEST": float(roi.nms_thresh),
            "BATCH_SIZE_PER_IMAGE": roi.fg_bg_sampler.batch_size_per_image,
        }
        pool = roi.box_roi_pool
        d2_model["ROI_BOX_HEAD"] = {
            "NAME": "FastRCNNConvFCHead", "NUM_FC": 2, "FC_DIM": cfg.box_head_dim,
            "POOLER_RESOLUTION": pool.output_size[0], "POOLER_SAMPLING_RATIO": pool.sampling_ratio,
            "POOLER_TYPE": "ROIAlign",  # torchvision's roi_align runs with aligned=False
            "BBOX_REG_WEIGHTS": [float(w) for w in roi.box_coder.weights], "CLS_AGNOSTIC_BBOX_REG": False,
        }
        if cfg.arch == "mask_rcnn":
            mpool = roi.mask_roi_pool
            d2_model["ROI_MASK_HEAD"] = {
                "NAME": "MaskRCNNConvUpsampleHead", "NUM_CONV": len(roi.mask_head), "CONV_DIM": cfg.mask_head_dim,
                "POOLER_RESOLUTION": mpool.output_size[0], "POOLER_SAMPLING_RATIO": mpool.sampling_ratio,
                "POOLER_TYPE": "ROIAlign", "CLS_AGNOSTIC_MASK": False,
            }
        detections = int(roi.detections_per_img)
    return {
        "VERSION": 2,
        "MODEL": d2_model,
        "INPUT": {"FORMAT": "RGB", "MIN_SIZE_TEST": int(model.transform.min_size[-1]),
                  "MAX_SIZE_TEST": int(model.transform.max_size)},
        "TEST": {"DETECTIONS_PER_IMAGE": detections},
    }


def write_detectron2_config(config: dict, out_path: str | Path, class_names: list[str] | None = None) -> Path:
    """The fragment as YAML, headed by how to use it and the class order (Detectron2's
    ``merge_from_file`` refuses keys it does not know, so the names go in a comment)."""
    import yaml

    lines = ["# Detectron2 config fragment written by `predet export`: torchvision's inference settings.",
             "#   cfg = get_cfg(); cfg.merge_from_file(this_file); cfg.MODEL.WEIGHTS = <the .pkl beside it>",
             "#   DefaultPredictor(cfg)(cv2.imread(path)): give it BGR, as cv2 reads; INPUT.FORMAT RGB makes it flip"]
    registered = [config["MODEL"]["ANCHOR_GENERATOR"]["NAME"]]
    if config["MODEL"]["META_ARCHITECTURE"] == "RetinaNet":
        registered.append(D2_RETINANET_P5_BACKBONE)
    lines.append(f"# register {' and '.join(registered)} first (README, 'Moving to Detectron2')")
    if class_names:
        lines.append("# class ids 0..K-1 in Detectron2 are: " + ", ".join(class_names))
    text = "\n".join(lines) + "\n" + yaml.safe_dump(config, sort_keys=False, default_flow_style=None)
    return atomic_write(out_path, lambda f: f.write(text.encode()))


def _pretrain_model_config(checkpoint: dict, path) -> dict:
    config = checkpoint.get("config") or {}
    model = config.get("model") if isinstance(config.get("model"), dict) else None
    if model is None:
        raise CheckpointError(f"{path} has no config.model: cannot tell its backbone and head sizes; "
                              "export takes a checkpoint written by predet pretrain or finetune")
    return model


def export_pretrained(checkpoint_path: str | Path, out_dir: str | Path,
                      formats=FORMATS, arch: str = "mask_rcnn") -> list[Path]:
    """Export what a PreDet checkpoint pre-trained (backbone, FPN, RPN conv, box head) for ``arch``.

    The weights go through the same transfer as fine-tuning (so RetinaNet gets its FPN index
    shift) and only transferred tensors are written: heads that start fresh are left out, so load
    the torchvision file with ``strict=False``. Files: ``<stem>-<arch>.safetensors`` and
    ``<stem>-<arch>-detectron2.pkl``.
    """
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"unknown export formats {unknown}; choose from {', '.join(FORMATS)}")
    path = Path(checkpoint_path)
    checkpoint = load_checkpoint(path)
    model = _pretrain_model_config(checkpoint, path)
    cfg = DetectorConfig(arch=arch, backbone=model.get("backbone", "resnet50"),
                         fpn_channels=model.get("fpn_channels", 256), box_head_dim=model.get("box_head_dim", 1024))
    detector = build_detector(cfg, num_classes=1)
    report = load_init_weights(detector, str(path), arch)
    full = detector.state_dict()
    state = {k: full[k] for k in report.loaded}
    out_dir = Path(out_dir)
    paths = []
    if "torchvision" in formats:
        meta = {"source": str(path), "kind": "predet_pretrain", **export_metadata(cfg, detector)}
        for key in ("labels", "num_classes_with_background", "rebuild"):  # class heads are not exported
            meta.pop(key)
        paths.append(export_torchvision(state, out_dir / f"{path.stem}-{arch}.safetensors", meta))
        text = json.dumps(meta, indent=1) + "\n"
        paths.append(atomic_write(out_dir / f"{path.stem}-{arch}.json", lambda f: f.write(text.encode())))
    if "detectron2" in formats:
        paths.append(export_detectron2(state, out_dir / f"{path.stem}-{arch}-detectron2.pkl", arch))
    return paths


def export_metadata(cfg: DetectorConfig, detector: nn.Module, cat_ids=(), class_names=()) -> dict:
    """What a plain-torchvision user needs to rebuild the detector and map its labels."""
    model = unwrap_model(detector)
    from predet import __version__

    return {
        "producer": f"predet {__version__}", "arch": cfg.arch, "backbone": cfg.backbone, "norm": cfg.norm,
        "num_classes_with_background": len(cat_ids) + 1,
        "labels": {str(i + 1): {"category_id": int(c), "name": n} for i, (c, n) in enumerate(zip(cat_ids, class_names))},
        "fpn_channels": cfg.fpn_channels, "box_head_dim": cfg.box_head_dim, "mask_head_dim": cfg.mask_head_dim,
        "anchor_sizes": cfg.anchor_sizes, "aspect_ratios": cfg.aspect_ratios,
        "min_size": cfg.min_size, "max_size": cfg.max_size,
        "image_mean": [float(m) for m in model.transform.image_mean],
        "image_std": [float(s) for s in model.transform.image_std],
        "detections_per_image": cfg.detections_per_image, "score_thresh": cfg.score_thresh,
        "rebuild": f"predet.modeling.detectors.build_detector(DetectorConfig(**config), num_classes={len(cat_ids)})",
        "config": dataclasses.asdict(cfg),
    }


def export_checkpoint(checkpoint_path: str | Path, out_dir: str | Path, formats=FORMATS,
                      arch: str = "mask_rcnn") -> list[Path]:
    """``predet export``: a pre-training checkpoint (its transferable parts) or a whole fine-tuned
    detector. Under torchrun rank 0 writes and the others wait for it (they return no paths)."""
    from predet.engine.distributed import barrier
    from predet.engine.launch import launched

    check_writable(out_dir, "--out")
    with launched("cpu", "export") as where:
        paths = []
        if where.is_main and Path(out_dir).is_dir() and any(Path(out_dir).iterdir()):
            logger.warning("%s already holds files: exported files of the same names replace them", out_dir)
        if where.is_main:
            with fresh_output(out_dir):
                paths = _export_checkpoint(checkpoint_path, out_dir, formats, arch)
        barrier()
    return paths


def _export_checkpoint(checkpoint_path, out_dir, formats, arch) -> list[Path]:
    path = Path(checkpoint_path)
    checkpoint = load_checkpoint(path)
    extra = checkpoint.get("extra_state")
    kind = extra.get("kind") if isinstance(extra, dict) else None
    if kind not in ("predet_pretrain", "predet_finetune"):
        raise CheckpointError(f"{path}: not a predet checkpoint (extra_state.kind={kind!r}); export "
                              "takes a .pth written by predet pretrain or predet finetune")
    if kind != "predet_finetune":
        return export_pretrained(path, out_dir, formats, arch)
    from predet.modeling.detectors import detector_from_checkpoint

    detector, cfg, extra = detector_from_checkpoint(checkpoint, path)
    out_dir = Path(out_dir)
    stem = f"{path.stem}-{cfg.model.arch}"
    names = list(extra.get("category_names") or [])
    meta = {"source": str(path), "kind": kind,
            **export_metadata(cfg.model, detector, extra["cat_ids"], names)}
    paths = []
    if "torchvision" in formats:
        paths.append(export_torchvision(detector, out_dir / f"{stem}.safetensors", meta))
        text = json.dumps(meta, indent=1) + "\n"
        paths.append(atomic_write(out_dir / f"{stem}.json", lambda f: f.write(text.encode())))
    if "detectron2" in formats:
        pkl = export_detectron2(detector, out_dir / f"{stem}-detectron2.pkl", cfg.model.arch)
        fragment = detectron2_config(cfg.model, len(extra["cat_ids"]), detector, weights=pkl.name)
        paths += [pkl, write_detectron2_config(fragment, out_dir / f"{stem}-detectron2.yaml", names)]
    return paths
