"""Target datasets for fine-tuning and evaluation: COCO-format and LVIS-v1 json.

Annotation files are validated in full when a dataset is built, so a broken record stops the
run at start-up with a message naming the file, the record and the field, rather than
crashing a DataLoader worker hours later. Boxes that the detectors cannot use are repaired
(clipped to the image) or left out (degenerate) and counted in ``dataset.stats``; the
evaluation ground truth (``dataset.coco`` / ``dataset.lvis``) keeps every record unchanged.

Samples are ``(image, target)`` in the form torchvision's Mask R-CNN / Faster R-CNN /
RetinaNet take: image uint8 CHW (the detectors here divide by 255 on the device); target ``boxes`` (xyxy), ``labels`` (1..K),
``masks``, ``image_id``, ``area``, ``iscrowd``. The only augmentation here is the horizontal
flip, decided by an explicit per-sample seed so that a resumed run (see
:class:`RepeatFactorBatchSampler` and ``predet.data.weak.DeterministicBatchSampler``) sees
the same flips as an uninterrupted one; resizing is left to the model's transform.
"""

from __future__ import annotations

import bisect
import contextlib
import io
import json
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch.utils.data import Dataset
from torchvision.transforms.functional import pil_to_tensor

from predet.data.images import open_rgb, stored_size_differs
from predet.data.weak import DeterministicBatchSampler, derive_seed
from predet.engine.checkpoint import atomic_write
from predet.errors import InputNotFound, UserError

__all__ = [
    "AnnotationError",
    "CocoDetection",
    "LVISDetection",
    "RepeatFactorBatchSampler",
    "build_detection_dataset",
    "collate_detection",
    "decode_segmentation",
    "load_coco_json",
    "load_lvis_json",
    "repeat_factors",
    "subset_path",
    "write_subset",
]

LVIS_FREQUENCIES = ("r", "c", "f")


class AnnotationError(UserError):
    """An annotation file (or an image it names) that does not fit the COCO/LVIS format."""


class UnreadableImage(Exception):
    """An image file that is missing or cannot be decoded (internal: becomes a skip)."""

    def __init__(self, path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------


def _brief(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _record_error(path, section: str, index: int, record: Any, field: str | None, message: str):
    """``file: section[i] (id N): field "f": message`` -- enough to find the record by hand."""
    where = f"{path}: {section}[{index}]"
    if isinstance(record, dict) and "id" in record:
        where += f" (id {_brief(record['id'])})"
    if field is not None:
        where += f': field "{field}"'
    return AnnotationError(f"{where}: {message}")


def _read_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise InputNotFound(f"annotation file not found: {path}")
    try:
        with path.open(encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise AnnotationError(
            f"{path}: line {exc.lineno}, column {exc.colno}: invalid JSON ({exc.msg})"
        ) from None
    except UnicodeDecodeError as exc:
        raise AnnotationError(f"{path}: not UTF-8 text ({exc})") from None
    if not isinstance(data, dict):
        raise AnnotationError(f"{path}: expected a JSON object at the top, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise AnnotationError(
                f'{path}: field "{key}": missing (a COCO-format file needs top-level '
                f'"images", "annotations" and "categories")'
            )
        if not isinstance(data[key], list):
            raise AnnotationError(f'{path}: field "{key}": expected a list, got {type(data[key]).__name__}')
    return data


def _check_ids(path, section: str, records: list) -> dict[int, int]:
    """Every record is an object with a unique int ``id``; returns id -> position."""
    seen: dict[int, int] = {}
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise _record_error(path, section, i, rec, None, f"expected an object, got {_brief(rec)}")
        if "id" not in rec:
            raise _record_error(path, section, i, rec, "id", "missing")
        if not _is_int(rec["id"]):
            raise _record_error(path, section, i, rec, "id", f"expected an integer, got {_brief(rec['id'])}")
        if rec["id"] in seen:
            raise _record_error(path, section, i, rec, "id", f"duplicate id (also {section}[{seen[rec['id']]}])")
        seen[rec["id"]] = i
    return seen


def _check_image(path, i: int, img: dict, lvis: bool) -> None:
    for field in ("width", "height"):
        if field not in img:
            raise _record_error(path, "images", i, img, field, "missing")
        if not _is_int(img[field]) or img[field] <= 0:
            raise _record_error(path, "images", i, img, field, f"expected a positive integer, got {_brief(img[field])}")
    name_fields = ("file_name", "coco_url") if lvis else ("file_name",)
    present = [f for f in name_fields if f in img]
    if not present:
        raise _record_error(path, "images", i, img, " or ".join(name_fields), "missing")
    for field in present:
        if not isinstance(img[field], str) or not img[field].strip():
            raise _record_error(path, "images", i, img, field, f"expected a non-empty string, got {_brief(img[field])}")


def _check_category(path, i: int, cat: dict, lvis: bool) -> None:
    if not isinstance(cat.get("name"), str) or not cat["name"]:
        raise _record_error(path, "categories", i, cat, "name", f"expected a non-empty string, got {_brief(cat.get('name'))}")
    if lvis and cat.get("frequency") not in LVIS_FREQUENCIES:  # LVIS AP is split by it (APr, APc, APf)
        raise _record_error(path, "categories", i, cat, "frequency", f"expected one of 'r', 'c', 'f', got {_brief(cat.get('frequency'))}")
    if lvis and "image_count" in cat and not _is_int(cat["image_count"]):
        raise _record_error(path, "categories", i, cat, "image_count", f"expected an integer, got {_brief(cat['image_count'])}")


def _compressed_rle_counts(text: str) -> list[int] | None:
    """The run lengths of a COCO compressed RLE string (pycocotools' rleFrString), or None
    when the string is not one: a character outside '0'..'o' or a number cut short."""
    counts: list[int] = []
    p = 0
    while p < len(text):
        x, k, more = 0, 0, True
        while more:
            if p >= len(text):
                return None
            c = ord(text[p]) - 48
            if not 0 <= c < 64:
                return None
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def _segmentation_problem(segm: Any, img: dict) -> str | None:
    """Why ``segm`` is not polygons / uncompressed RLE / compressed RLE for ``img`` (None if it is)."""
    if isinstance(segm, list):
        for part in segm:
            if not isinstance(part, list) or len(part) % 2:
                return "expected a list of polygons (flat lists [x1, y1, x2, y2, ...] of even length)"
            bad = [v for v in part if not _is_number(v) or not math.isfinite(v)]
            if bad:
                return f"polygon coordinates must be finite numbers, got {_brief(bad[0])}"
        return None
    if isinstance(segm, dict):
        size, counts = segm.get("size"), segm.get("counts")
        if size != [img["height"], img["width"]]:
            return f'RLE "size" {_brief(size)} does not match the image [height, width] [{img["height"]}, {img["width"]}]'
        if isinstance(counts, str):
            runs = _compressed_rle_counts(counts)
            if runs is None or any(r < 0 for r in runs):
                return f'compressed RLE "counts" is not a valid COCO RLE string: {_brief(counts)}'
            if sum(runs) != img["height"] * img["width"]:
                return (f'compressed RLE "counts" covers {sum(runs)} pixels, not height * width = '
                        f'{img["height"] * img["width"]}')
            return None
        if isinstance(counts, list) and all(_is_int(c) for c in counts):
            if sum(counts) != img["height"] * img["width"]:
                return f"uncompressed RLE counts sum to {sum(counts)}, not height * width = {img['height'] * img['width']}"
            return None
        return 'RLE "counts" must be a string (compressed) or a list of run lengths (uncompressed)'
    return f"expected polygons (a list) or RLE (an object), got {_brief(segm)}"


def _check_annotation(path, i: int, ann: dict, images: dict, cats: set) -> None:
    if "image_id" not in ann:
        raise _record_error(path, "annotations", i, ann, "image_id", "missing")
    if ann["image_id"] not in images:
        raise _record_error(path, "annotations", i, ann, "image_id", f"unknown image {_brief(ann['image_id'])}")
    if "category_id" not in ann:
        raise _record_error(path, "annotations", i, ann, "category_id", "missing")
    if ann["category_id"] not in cats:
        raise _record_error(path, "annotations", i, ann, "category_id", f"unknown category {_brief(ann['category_id'])}")
    bbox = ann.get("bbox")
    if "bbox" not in ann:
        raise _record_error(path, "annotations", i, ann, "bbox", "missing")
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
        raise _record_error(path, "annotations", i, ann, "bbox", f"expected 4 numbers [x, y, w, h], got {_brief(bbox)}")
    if ann.get("iscrowd", 0) not in (0, 1):
        raise _record_error(path, "annotations", i, ann, "iscrowd", f"expected 0 or 1, got {_brief(ann['iscrowd'])}")
    if "area" in ann and not _is_number(ann["area"]):
        raise _record_error(path, "annotations", i, ann, "area", f"expected a number, got {_brief(ann['area'])}")
    if "segmentation" in ann:
        problem = _segmentation_problem(ann["segmentation"], images[ann["image_id"]])
        if problem:
            raise _record_error(path, "annotations", i, ann, "segmentation", problem)


def _check_lvis_image_categories(path, i: int, img: dict, cats: set) -> None:
    """LVIS federated evaluation reads these lists; an unknown id there fails only at eval time."""
    for field in ("neg_category_ids", "not_exhaustive_category_ids"):
        ids = img.get(field, [])
        if not isinstance(ids, list):
            raise _record_error(path, "images", i, img, field, f"expected a list of category ids, got {_brief(ids)}")
        unknown = [c for c in ids if c not in cats]
        if unknown:
            raise _record_error(path, "images", i, img, field, f"unknown category {_brief(unknown[0])}")


def _validate(data: dict, path, lvis: bool) -> dict:
    for key in ("images", "categories"):
        if not data[key]:
            raise AnnotationError(f'{path}: field "{key}": empty; a data set needs at least one '
                                  f"of its {key} (is this the right file?)")
    _check_ids(path, "images", data["images"])
    for i, img in enumerate(data["images"]):
        _check_image(path, i, img, lvis)
    cat_pos = _check_ids(path, "categories", data["categories"])
    for i, cat in enumerate(data["categories"]):
        _check_category(path, i, cat, lvis)
    cats = set(cat_pos)
    if lvis:
        for i, img in enumerate(data["images"]):
            _check_lvis_image_categories(path, i, img, cats)
    _check_ids(path, "annotations", data["annotations"])
    images = {img["id"]: img for img in data["images"]}
    for i, ann in enumerate(data["annotations"]):
        _check_annotation(path, i, ann, images, cats)
    return data


def load_coco_json(path: str | Path) -> dict:
    """Read and check a COCO-format file; every problem is an :class:`AnnotationError`."""
    return _validate(_read_json(path), path, lvis=False)


def load_lvis_json(path: str | Path) -> dict:
    """Like :func:`load_coco_json` for LVIS v1: images may name their file by ``coco_url``."""
    return _validate(_read_json(path), path, lvis=True)


def _looks_like_lvis(data: dict) -> bool:
    return any("frequency" in c for c in data["categories"][:1]) or any(
        "file_name" not in img and "coco_url" in img for img in data["images"][:1]
    )


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
            raise _record_error(self.ann_file, "images", i, images[i], field, f"image file not found: {paths[i]}{more}")
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
            if not _is_number(area) or not math.isfinite(area) or area <= 0:
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
            raise _record_error(
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
                raise _record_error(self.ann_file, "images", self._image_pos[image_id],
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


# --------------------------------------------------------------------------------------
# Repeat-factor sampling (LVIS)
# --------------------------------------------------------------------------------------


def _repeat_factors(image_labels: Sequence[Iterable[int]], threshold: float) -> torch.Tensor:
    if threshold <= 0:
        raise ValueError(f"threshold must be > 0, got {threshold}")
    n = len(image_labels)
    if n == 0:
        raise ValueError("cannot compute repeat factors of an empty dataset")
    per_image = [set(int(c) for c in labels) for labels in image_labels]
    image_freq = Counter(c for cats in per_image for c in cats)
    cat_factor = {c: max(1.0, math.sqrt(threshold / (k / n))) for c, k in image_freq.items()}
    return torch.tensor([max((cat_factor[c] for c in cats), default=1.0) for cats in per_image],
                        dtype=torch.float32)


def repeat_factors(dataset: Any, threshold: float = 0.001) -> torch.Tensor:
    """Per-image repeat factors (LVIS paper, Detectron2's RepeatFactorTrainingSampler).

    f(c) is the fraction of the dataset's images (empty ones included) whose training
    targets contain c; r(c) = max(1, sqrt(threshold / f(c))); an image repeats by the max
    r(c) over its categories, 1 without any. ``dataset`` is a :class:`CocoDetection` or a
    sequence of per-image category collections.
    """
    labels = dataset.image_labels() if hasattr(dataset, "image_labels") else list(dataset)
    return _repeat_factors(labels, threshold)


def _epoch_counts(factors: torch.Tensor, seed: int, epoch: int) -> torch.Tensor:
    """Stochastic rounding: image i appears floor(r) times, plus once more with prob. frac(r)."""
    gen = torch.Generator().manual_seed(derive_seed("rfs-round", seed, epoch))
    whole = factors.floor()
    extra = torch.rand(len(factors), generator=gen, dtype=torch.float64) < (factors - whole)
    return whole.long() + extra.long()


def _epoch_indices(factors: torch.Tensor, seed: int, epoch: int) -> torch.Tensor:
    """The image indices of one repeat-factor epoch, shuffled; depends only on (seed, epoch)."""
    counts = _epoch_counts(factors, seed, epoch)
    indices = torch.repeat_interleave(torch.arange(len(factors)), counts)
    gen = torch.Generator().manual_seed(derive_seed("epoch", seed, epoch))
    return indices[torch.randperm(len(indices), generator=gen)]


class RepeatFactorBatchSampler(DeterministicBatchSampler):
    """:class:`DeterministicBatchSampler` over repeat-factor epochs instead of plain permutations.

    Epoch e is the stochastic rounding of ``repeat_factors`` from (seed, e), shuffled by a
    permutation from (seed, e); epochs have different lengths, so the epoch of a stream
    position is found from their cumulative lengths (computed from the roundings alone).
    Iteration i still depends only on (seed, i): ``start_iter=k`` resumes exactly, and each
    rank keeps its slice of the global batch.
    """

    def __init__(
        self,
        repeat_factors: torch.Tensor | Sequence[float],
        batch_size: int,
        seed: int = 0,
        start_iter: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        factors = torch.as_tensor(repeat_factors, dtype=torch.float64).flatten()
        if len(factors) and (not torch.isfinite(factors).all() or (factors < 1).any()):
            raise ValueError("repeat factors must be finite and >= 1")
        super().__init__(len(factors), batch_size, seed, start_iter, rank, world_size)
        self.repeat_factors = factors
        self._starts = [0]  # stream position at which each epoch begins (one more than known epochs)

    def _epoch_of(self, position: int) -> int:
        while self._starts[-1] <= position:
            epoch = len(self._starts) - 1
            self._starts.append(self._starts[-1] + int(_epoch_counts(self.repeat_factors, self.seed, epoch).sum()))
        return bisect.bisect_right(self._starts, position) - 1

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            while len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = _epoch_indices(self.repeat_factors, self.seed, epoch)
        return self._perms[epoch]

    def _item(self, iteration: int, pos: int) -> tuple[int, int]:
        position = iteration * self.global_batch_size + pos
        epoch = self._epoch_of(position)
        index = int(self._perm(epoch)[position - self._starts[epoch]])
        return index, derive_seed("sample", self.seed, iteration, pos)


# --------------------------------------------------------------------------------------
# Subsets (small target sets)
# --------------------------------------------------------------------------------------


def subset_path(ann_file: str | Path, n: int, seed: int, out_dir: str | Path | None = None) -> Path:
    """``train.json`` -> ``<out_dir>/train.subset1000.seed0.json`` (out_dir: next to the file)."""
    ann_file = Path(ann_file)
    folder = Path(out_dir) if out_dir is not None else ann_file.parent
    return folder / f"{ann_file.stem}.subset{int(n)}.seed{int(seed)}.json"


def write_subset(ann_file: str | Path, num_images: int, seed: int, out_path: str | Path) -> Path:
    """A random N-image subset with all its annotations and every category, as json.

    The choice is the first N of a permutation of the images sorted by id, drawn from
    ``seed``: the same seed gives identical bytes whatever the input order, and a smaller
    subset is contained in a larger one with the same seed. Other top-level keys (info,
    licenses) are copied; LVIS category counts are left as in the full set.
    """
    data = _read_json(ann_file)
    _validate(data, ann_file, lvis=_looks_like_lvis(data))
    ids = sorted(img["id"] for img in data["images"])
    num_images = int(num_images)
    if not 0 < num_images <= len(ids):
        raise UserError(
            f"data.subset={num_images}: {ann_file} has {len(ids)} images; give a subset between 1 "
            f"and {len(ids)} (or 0 for all)"
        )
    order = np.random.default_rng(derive_seed("subset", int(seed))).permutation(len(ids))
    chosen = {ids[i] for i in order[:num_images]}
    subset = {
        "images": sorted((img for img in data["images"] if img["id"] in chosen), key=lambda r: r["id"]),
        "annotations": sorted((a for a in data["annotations"] if a["image_id"] in chosen), key=lambda r: r["id"]),
    }
    out = {key: subset.get(key, value) for key, value in data.items()}
    text = json.dumps(out, separators=(",", ":"))
    return atomic_write(out_path, lambda f: f.write(text.encode("utf-8")))
