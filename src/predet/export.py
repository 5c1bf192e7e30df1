"""Export detectors and PreDet checkpoints for other codebases (DESIGN §1, §2 "Transfer").

Two formats:

* torchvision: a ``.safetensors`` file whose keys are those of plain torchvision detectors
  (``maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=K + 1)`` loads a full
  detector export with ``strict=True``);
* Detectron2: the model-zoo ``.pkl`` layout ``{"model": {name: ndarray}, "__author__": ...}`` that
  ``DetectionCheckpointer`` reads, with names from the one table in
  :mod:`predet.detection.transfer` (``to_detectron2``), the same table the import uses.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import torch
from torch import nn

from predet.detection.models import DetectorConfig, build_detector
from predet.detection.transfer import infer_arch, load_init_weights, to_detectron2
from predet.engine.checkpoint import atomic_write, load_checkpoint
from predet.engine.distributed import unwrap_model
from predet.engine.runfolder import fresh_output
from predet.errors import CheckpointError

FORMATS = ("torchvision", "detectron2")


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


def detectron2_state_dict(detector_or_state_dict, arch: str | None = None) -> dict[str, np.ndarray]:
    """Detectron2-named NumPy arrays; ``num_batches_tracked`` counters are dropped.

    ``arch`` fixes the FPN level numbering (RetinaNet's FPN starts at C3); it is inferred from the
    keys when None. Raises ValueError listing the tensors the table cannot name (e.g. a RegNet
    body, which Detectron2 names after pycls).
    """
    state = _state_dict(detector_or_state_dict)
    arch = arch or infer_arch(state)
    out, unnamed = {}, []
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        name = to_detectron2(key, arch)
        if name is None:
            unnamed.append(key)
            continue
        out[name] = np.ascontiguousarray(value.detach().to("cpu").numpy())
    if unnamed:
        shown = ", ".join(unnamed[:5]) + (f" (+{len(unnamed) - 5} more)" if len(unnamed) > 5 else "")
        raise ValueError(
            f"no Detectron2 name for {len(unnamed)} tensors: {shown}; the Detectron2 export covers "
            "ResNet/ResNeXt backbones, FPN, RPN, box/mask heads and the RetinaNet head"
        )
    return out


def export_detectron2(detector_or_state_dict, out_path: str | Path, arch: str | None = None) -> Path:
    """Write Detectron2 model-zoo ``.pkl`` weights (BN as ``.norm.*``, exact names, no heuristics).

    Class-specific predictors are written as they are, for users who fine-tune again:
    Detectron2 puts background last in ``cls_score`` (torchvision first) and its RetinaNet has
    no background logit, so their rows do not line up class-for-class. The arrays are pickled
    with protocol 4 (NumPy >= 1.26.1 reads NumPy 2 array pickles).
    """
    payload = {"model": detectron2_state_dict(detector_or_state_dict, arch), "__author__": "predet",
               "matching_heuristics": False}
    return atomic_write(out_path, lambda f: pickle.dump(payload, f, protocol=4))


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
        meta = {"source": str(path), "arch": arch, "backbone": cfg.backbone, "kind": "predet_pretrain"}
        paths.append(export_torchvision(state, out_dir / f"{path.stem}-{arch}.safetensors", meta))
    if "detectron2" in formats:
        paths.append(export_detectron2(state, out_dir / f"{path.stem}-{arch}-detectron2.pkl", arch))
    return paths


def export_checkpoint(checkpoint_path: str | Path, out_dir: str | Path, formats=FORMATS,
                      arch: str = "mask_rcnn") -> list[Path]:
    """``predet export``: a pre-training checkpoint (its transferable parts) or a whole fine-tuned detector."""
    with fresh_output(out_dir):
        return _export_checkpoint(checkpoint_path, out_dir, formats, arch)


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
    from predet.finetune import detector_from_checkpoint

    detector, cfg, _ = detector_from_checkpoint(checkpoint, path)
    out_dir = Path(out_dir)
    paths = []
    if "torchvision" in formats:
        meta = {"source": str(path), "arch": cfg.model.arch, "backbone": cfg.model.backbone, "kind": kind}
        paths.append(export_torchvision(detector, out_dir / f"{path.stem}-{cfg.model.arch}.safetensors", meta))
    if "detectron2" in formats:
        paths.append(export_detectron2(detector, out_dir / f"{path.stem}-{cfg.model.arch}-detectron2.pkl",
                                       cfg.model.arch))
    return paths
