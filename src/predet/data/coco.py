"""Target datasets for fine-tuning and evaluation: COCO-format and LVIS-v1 json.

Annotation files are validated in full when a dataset is built (:mod:`predet.data.coco_json`),
so a broken record stops the run at start-up. Boxes that the detectors cannot use are repaired
(clipped to the image) or left out (degenerate) and counted in ``dataset.stats``; the
evaluation ground truth (``dataset.coco`` / ``dataset.lvis``) keeps every record unchanged.

Samples are ``(image, target)`` in the form torchvision's Mask R-CNN / Faster R-CNN /
RetinaNet take: image uint8 CHW (the detectors here divide by 255 on the device); target
``boxes`` (xyxy), ``labels`` (1..K), ``masks``, ``image_id``, ``area``, ``iscrowd``. The only
augmentation here is the horizontal flip, decided by an explicit per-sample seed so that a
resumed run (see ``predet.data.samplers``) sees the same flips as an uninterrupted one; resizing
is left to the model's transform.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch.utils.data import Dataset
from torchvision.transforms.functional import pil_to_tensor

from predet.data.coco_json import (
    LVIS_FREQUENCIES,
    is_number,
    load_coco_json,
    load_lvis_json,
    record_error,
)
from predet.data.images import open_rgb, stored_size_differs

__all__ = ["CocoDetection", "LVISDetection", "build_detection_dataset", "collate_detection", "decode_segmentation"]


class UnreadableImage(Exception):
    """An image file that is missing or cannot be decoded (internal: becomes a skip)."""

    def __init__(self, path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


# --------------------------------------------------------------------------------------
# Boxes and masks
# --------------------------------------------------------------------------------------


def _clip_box(bbox: Sequence[float], width: int, height: int) -> tuple[tuple | None, bool]:
    """xywh -> xyxy clipped to the image; (None, False) when degenerate (w or h <= 1 px)."""
    x, y, w, h = (float(v) for v in bbox)
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        return None, False
    raw = (x, y, x + w, y + h)
    x1, x2 = (min(max(v, 0.0), float(width)) for v in (raw[0], raw[2]))
    y1, y2 = (min(max(v, 0.0), float(height)) for v in (raw[1], raw[3]))
    if x2 - x1 <= 1.0 or y2 - y1 <= 1.0:
        return None, False
    return (x1, y1, x2, y2), (x1, y1, x2, y2) != raw


def _usable_polygons(segm: list) -> list:
    """Polygon parts with at least 3 points; pycocotools reads a 4-number part as a box."""
    return [part for part in segm if len(part) >= 6]


def _has_mask(segm: Any) -> bool:
    if isinstance(segm, dict):
        return True
    return isinstance(segm, list) and bool(_usable_polygons(segm))


def decode_segmentation(segm: list | dict, height: int, width: int) -> np.ndarray:
    """Polygons, uncompressed RLE or compressed RLE -> uint8 mask [height, width]."""
    if isinstance(segm, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(_usable_polygons(segm), height, width))
    elif isinstance(segm["counts"], list):
        rle = mask_utils.frPyObjects(segm, height, width)
    else:
        rle = segm
    return mask_utils.decode(rle)


def _box_mask(box: np.ndarray, height: int, width: int) -> np.ndarray:
    """The pixels a box covers: the stand-in for an annotation without a segmentation."""
    mask = np.zeros((height, width), dtype=np.uint8)
    x1, y1 = int(math.floor(box[0])), int(math.floor(box[1]))
    x2, y2 = int(math.ceil(box[2])), int(math.ceil(box[3]))
    mask[y1:y2, x1:x2] = 1
    return mask


def _flip_boxes(boxes: torch.Tensor, width: int) -> torch.Tensor:
    flipped = boxes.clone()
    flipped[:, 0] = width - boxes[:, 2]
    flipped[:, 2] = width - boxes[:, 0]
    return flipped


def _split_key(key: int | tuple[int, int]) -> tuple[int, int]:
    """``i`` or ``(i, sample_seed)``; a plain index is its own seed."""
    if isinstance(key, (tuple, list)):
        return int(key[0]), int(key[1])
    return int(key), int(key)


# --------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------


@dataclass
class _ImageTargets:
    """Training targets of one image, prepared once at init (crowd and degenerate removed)."""

    boxes: np.ndarray  # float32 [M, 4] xyxy, clipped
    labels: np.ndarray  # int64 [M], 1..K
    areas: np.ndarray  # float32 [M]
    segms: list  # per instance: the json segmentation, or None for "use the box"


def _quiet_coco(data: dict) -> COCO:
    """A pycocotools index over an already-checked dict (its constructor would re-read and print)."""
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _missing_files(paths: Sequence[Path]) -> list[int]:
    """Positions of paths that do not exist; one directory listing per folder, not a stat per file."""
    listings: dict[Path, set[str]] = {}
    missing = []
    for i, p in enumerate(paths):
        if p.parent not in listings:
            try:
                listings[p.parent] = set(os.listdir(p.parent))
            except OSError:
                listings[p.parent] = set()
        if p.name not in listings[p.parent]:
            missing.append(i)
    return missing


class CocoDetection(Dataset):
    """A COCO-format detection / instance-segmentation set for torchvision detectors.

    ``dataset[i]`` or ``dataset[(i, sample_seed)]`` (the form the batch samplers yield).
    Labels are contiguous: label ``i + 1`` is category ``cat_ids[i]`` (sorted ids).
    ``coco`` is the unmodified ground truth for COCOeval, crowd regions included.
    """

    kind = "coco"

    def __init__(
        self,
        ann_file: str | Path,
        image_root: str | Path,
        train: bool = False,
        flip_p: float = 0.5,
        masks: bool = True,
    ):
        if not 0.0 <= flip_p <= 1.0:
            raise ValueError(f"flip_p must be in [0, 1], got {flip_p}")
        self.ann_file = str(ann_file)
        self.image_root = Path(image_root)
        self.train = train
        self.flip_p = flip_p
        self.masks = masks
        data = self._load(self.ann_file)
        self._set_categories(data["categories"])
        self._set_api(data)
        self._image_pos = {img["id"]: i for i, img in enumerate(data["images"])}
        self._images = {img["id"]: img for img in data["images"]}
        self.image_ids = sorted(self._images)
        self._paths = self._check_files(data["images"])
        self._targets, self.stats = self._prepare_targets(data)

    # -- construction -------------------------------------------------------------------

    def _load(self, path: str) -> dict:
        return load_coco_json(path)

    def _set_api(self, data: dict) -> None:
        self.coco = _quiet_coco(data)

    def _set_categories(self, categories: list[dict]) -> None:
        self.categories = sorted(categories, key=lambda c: c["id"])
        self.cat_ids = [c["id"] for c in self.categories]
        self.category_names = [c["name"] for c in self.categories]
        self.cat_id_to_label = {cid: i + 1 for i, cid in enumerate(self.cat_ids)}

    def _file_field(self, img: dict) -> tuple[str, str]:
        """(json field the name came from, path relative to image_root)."""
        return "file_name", img["file_name"]

    def _check_files(self, images: list[dict]) -> dict[int, Path]:
        paths = [self.image_root / self._file_field(img)[1] for img in images]
        missing = _missing_files(paths)
        if missing:
            i = missing[0]
            more = f" ({len(missing) - 1} more images are missing)" if len(missing) > 1 else ""
            field = self._file_field(images[i])[0]
            raise record_error(self.ann_file, "images", i, images[i], field, f"image file not found: {paths[i]}{more}")
        return {img["id"]: p for img, p in zip(images, paths)}

    def _prepare_targets(self, data: dict) -> tuple[list[_ImageTargets], dict]:
        stats = dict(images=len(self.image_ids), annotations=len(data["annotations"]), crowd=0,
                     clipped=0, dropped=0, mask_from_box=0, empty_images=0)
        per_image: dict[int, list] = {iid: [] for iid in self.image_ids}
        for ann in data["annotations"]:
            if ann.get("iscrowd", 0):
                stats["crowd"] += 1
                continue
            img = self._images[ann["image_id"]]
            box, clipped = _clip_box(ann["bbox"], img["width"], img["height"])
            if box is None:
                stats["dropped"] += 1
                continue
            stats["clipped"] += int(clipped)
            segm = ann.get("segmentation")
            if not _has_mask(segm):
                segm = None
                stats["mask_from_box"] += int(self.masks)
            area = ann.get("area")
            if not is_number(area) or not math.isfinite(area) or area <= 0:
                area = (box[2] - box[0]) * (box[3] - box[1])
            per_image[ann["image_id"]].append((box, self.cat_id_to_label[ann["category_id"]], area, segm))
        targets = [self._pack(per_image[iid]) for iid in self.image_ids]
        stats["empty_images"] = sum(len(t.labels) == 0 for t in targets)
        return targets, stats

    @staticmethod
    def _pack(items: list) -> _ImageTargets:
        return _ImageTargets(
            boxes=np.array([it[0] for it in items], dtype=np.float32).reshape(-1, 4),
            labels=np.array([it[1] for it in items], dtype=np.int64),
            areas=np.array([it[2] for it in items], dtype=np.float32),
            segms=[it[3] for it in items],
        )

    # -- queries ------------------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        """K foreground classes; torchvision heads take K + 1 (background is label 0)."""
        return len(self.cat_ids)

    def contiguous_to_cat_id(self, label: int) -> int:
        """Model label (1..K) -> category id of the json, for writing results."""
        label = int(label)
        if not 1 <= label <= len(self.cat_ids):
            raise ValueError(f"label {label} out of range 1..{len(self.cat_ids)}")
        return self.cat_ids[label - 1]

    def image_labels(self) -> list[np.ndarray]:
        """Contiguous labels of each image's training targets, in dataset order."""
        return [t.labels for t in self._targets]

    def image_path(self, index: int) -> Path:
        return self._paths[self.image_ids[index]]

    def stats_summary(self) -> str:
        s = self.stats
        return (
            f"{self.ann_file}: {s['images']} images ({s['empty_images']} without training targets), "
            f"{s['annotations']} annotations, {len(self.cat_ids)} categories; "
            f"{s['crowd']} crowd (evaluation only), {s['clipped']} boxes clipped to the image, "
            f"{s['dropped']} degenerate boxes dropped, {s['mask_from_box']} masks filled from boxes"
        )

    def __len__(self) -> int:
        return len(self.image_ids)

    # -- samples ------------------------------------------------------------------------

    def _read_image(self, image_id: int) -> Image.Image:
        record = self._images[image_id]
        try:
            image = open_rgb(self._paths[image_id])  # upright (EXIF), 8-bit RGB: data/images.py
        except FileNotFoundError:
            raise UnreadableImage(self._paths[image_id], "not found") from None
        except Exception as exc:  # PIL raises many types for bad data; all mean "unusable"
            raise UnreadableImage(self._paths[image_id], f"{type(exc).__name__}: {exc}") from None
        if image.size != (record["width"], record["height"]):
            turned = stored_size_differs(self._paths[image_id]) and image.size == (record["height"], record["width"])
            why = (" (its EXIF orientation turns it upright; boxes must be given on the upright image)"
                   if turned else "")
            raise record_error(
                self.ann_file, "images", self._image_pos[image_id], record, "width",
                f"{self._paths[image_id]} is {image.size[0]}x{image.size[1]}{why}, "
                f"the record says {record['width']}x{record['height']}",
            )
        return image

    def _masks(self, t: _ImageTargets, height: int, width: int) -> torch.Tensor:
        if not t.segms:
            return torch.zeros((0, height, width), dtype=torch.uint8)
        planes = [
            decode_segmentation(segm, height, width) if segm is not None else _box_mask(box, height, width)
            for segm, box in zip(t.segms, t.boxes)
        ]
        return torch.from_numpy(np.stack(planes).astype(np.uint8, copy=False))

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor | None, dict]:
        """(image, target). A training image that cannot be read comes back as
        ``(None, {"skipped": path, "reason": ...})`` to be counted, not to end the run; in an
        evaluation set it is an error (its metrics would silently change)."""
        index, seed = _split_key(key)
        image_id = self.image_ids[index]
        width, height = self._images[image_id]["width"], self._images[image_id]["height"]
        try:
            image = pil_to_tensor(self._read_image(image_id))  # uint8; the detector makes it float
        except UnreadableImage as exc:
            if not self.train:
                raise record_error(self.ann_file, "images", self._image_pos[image_id],
                                    self._images[image_id], self._file_field(self._images[image_id])[0],
                                    f"cannot read {exc.path}: {exc.reason}") from None
            return None, {"skipped": str(exc.path), "reason": exc.reason}
        t = self._targets[index]
        target = {
            "boxes": torch.from_numpy(t.boxes.copy()),
            "labels": torch.from_numpy(t.labels.copy()),
            "image_id": int(image_id),
            "area": torch.from_numpy(t.areas.copy()),
            "iscrowd": torch.zeros(len(t.labels), dtype=torch.int64),
        }
        if self.masks:
            target["masks"] = self._masks(t, height, width)
        if self.train and np.random.default_rng(seed).random() < self.flip_p:
            image = image.flip(-1)
            target["boxes"] = _flip_boxes(target["boxes"], width)
            if self.masks:
                target["masks"] = target["masks"].flip(-1)
        return image, target


def _lvis_file_name(img: dict) -> tuple[str, str]:
    """LVIS v1 names images by URL; its last two parts are ``train2017/<name>`` or ``val2017/<name>``."""
    if "file_name" in img:
        return "file_name", img["file_name"]
    parts = img["coco_url"].rstrip("/").split("/")
    return "coco_url", "/".join(parts[-2:])


def _lvis_api(data: dict):
    """A faster-coco-eval index over an already-checked LVIS dict: what LVIS evaluation
    (its federated mode) reads; it takes the same records as COCO's index."""
    from faster_coco_eval import COCO as FasterCOCO

    return FasterCOCO(data, use_deepcopy=True)


class LVISDetection(CocoDetection):
    """LVIS v1; ``lvis`` is the ground truth index LVIS evaluation reads.

    ``coco`` is None: COCO AP is the wrong metric for LVIS's federated annotations.
    ``frequency`` and ``image_count`` are aligned with ``cat_ids`` (index i is label i + 1).
    LVIS has no crowd regions; ``iscrowd`` is treated as 0 where absent.
    """

    kind = "lvis"

    def _load(self, path: str) -> dict:
        return load_lvis_json(path)

    def _set_api(self, data: dict) -> None:
        self.coco = None
        self.lvis = _lvis_api(data)

    def _set_categories(self, categories: list[dict]) -> None:
        super()._set_categories(categories)
        self.frequency = [c.get("frequency") for c in self.categories]
        self.image_count = [c.get("image_count") for c in self.categories]

    def _file_field(self, img: dict) -> tuple[str, str]:
        return _lvis_file_name(img)

    def labels_with_frequency(self, frequency: str) -> list[int]:
        """Contiguous labels of the rare ('r'), common ('c') or frequent ('f') categories."""
        if frequency not in LVIS_FREQUENCIES:
            raise ValueError(f"frequency must be one of {LVIS_FREQUENCIES}, got {frequency!r}")
        return [i + 1 for i, f in enumerate(self.frequency) if f == frequency]


def build_detection_dataset(
    ann_file: str | Path,
    image_root: str | Path,
    kind: str = "coco",
    train: bool = False,
    masks: bool = True,
    flip_p: float = 0.5,
) -> CocoDetection:
    classes = {"coco": CocoDetection, "lvis": LVISDetection}
    if kind not in classes:
        raise ValueError(f"unknown dataset kind {kind!r}; expected one of {sorted(classes)}")
    return classes[kind](ann_file, image_root, train=train, flip_p=flip_p, masks=masks)


def collate_detection(samples: Sequence[tuple[torch.Tensor | None, dict]]) -> dict:
    """Images differ in size, so they stay a list (the detector's transform batches them).
    Unreadable images travel as ``skipped`` (path, reason) pairs for the trainer to count."""
    kept = [(image, target) for image, target in samples if image is not None]
    return {
        "images": [image for image, _ in kept],
        "targets": [target for _, target in kept],
        "num_images": len(kept),
        "skipped": [(t["skipped"], t["reason"]) for image, t in samples if image is None],
    }
