"""COCO-format and LVIS-v1 annotation files: read, check in full, and cut into subsets.

A file is validated in full when it is read, so a broken record stops a run at start-up with a
message naming the file, the record and the field (one line, exit 2: ``AnnotationError``),
rather than crashing a DataLoader worker hours later. The datasets built on these files are in
:mod:`predet.data.coco`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from predet.checkpoint.atomic import atomic_write
from predet.data.samplers import derive_seed
from predet.errors import InputNotFound, UserError

__all__ = ["AnnotationError", "LVIS_FREQUENCIES", "load_coco_json", "load_lvis_json", "subset_path", "write_subset"]

LVIS_FREQUENCIES = ("r", "c", "f")


class AnnotationError(UserError):
    """An annotation file (or an image it names) that does not fit the COCO/LVIS format."""


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------


def _brief(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def record_error(path, section: str, index: int, record: Any, field: str | None, message: str):
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
            raise record_error(path, section, i, rec, None, f"expected an object, got {_brief(rec)}")
        if "id" not in rec:
            raise record_error(path, section, i, rec, "id", "missing")
        if not _is_int(rec["id"]):
            raise record_error(path, section, i, rec, "id", f"expected an integer, got {_brief(rec['id'])}")
        if rec["id"] in seen:
            raise record_error(path, section, i, rec, "id", f"duplicate id (also {section}[{seen[rec['id']]}])")
        seen[rec["id"]] = i
    return seen


def _check_image(path, i: int, img: dict, lvis: bool) -> None:
    for field in ("width", "height"):
        if field not in img:
            raise record_error(path, "images", i, img, field, "missing")
        if not _is_int(img[field]) or img[field] <= 0:
            raise record_error(path, "images", i, img, field, f"expected a positive integer, got {_brief(img[field])}")
    name_fields = ("file_name", "coco_url") if lvis else ("file_name",)
    present = [f for f in name_fields if f in img]
    if not present:
        raise record_error(path, "images", i, img, " or ".join(name_fields), "missing")
    for field in present:
        if not isinstance(img[field], str) or not img[field].strip():
            raise record_error(path, "images", i, img, field, f"expected a non-empty string, got {_brief(img[field])}")


def _check_category(path, i: int, cat: dict, lvis: bool) -> None:
    if not isinstance(cat.get("name"), str) or not cat["name"]:
        raise record_error(path, "categories", i, cat, "name", f"expected a non-empty string, got {_brief(cat.get('name'))}")
    if lvis and cat.get("frequency") not in LVIS_FREQUENCIES:  # LVIS AP is split by it (APr, APc, APf)
        raise record_error(path, "categories", i, cat, "frequency", f"expected one of 'r', 'c', 'f', got {_brief(cat.get('frequency'))}")
    if lvis and "image_count" in cat and not _is_int(cat["image_count"]):
        raise record_error(path, "categories", i, cat, "image_count", f"expected an integer, got {_brief(cat['image_count'])}")


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
            bad = [v for v in part if not is_number(v) or not math.isfinite(v)]
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
        raise record_error(path, "annotations", i, ann, "image_id", "missing")
    if ann["image_id"] not in images:
        raise record_error(path, "annotations", i, ann, "image_id", f"unknown image {_brief(ann['image_id'])}")
    if "category_id" not in ann:
        raise record_error(path, "annotations", i, ann, "category_id", "missing")
    if ann["category_id"] not in cats:
        raise record_error(path, "annotations", i, ann, "category_id", f"unknown category {_brief(ann['category_id'])}")
    bbox = ann.get("bbox")
    if "bbox" not in ann:
        raise record_error(path, "annotations", i, ann, "bbox", "missing")
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(is_number(v) for v in bbox):
        raise record_error(path, "annotations", i, ann, "bbox", f"expected 4 numbers [x, y, w, h], got {_brief(bbox)}")
    if ann.get("iscrowd", 0) not in (0, 1):
        raise record_error(path, "annotations", i, ann, "iscrowd", f"expected 0 or 1, got {_brief(ann['iscrowd'])}")
    if "area" in ann and not is_number(ann["area"]):
        raise record_error(path, "annotations", i, ann, "area", f"expected a number, got {_brief(ann['area'])}")
    if "segmentation" in ann:
        problem = _segmentation_problem(ann["segmentation"], images[ann["image_id"]])
        if problem:
            raise record_error(path, "annotations", i, ann, "segmentation", problem)


def _check_lvis_image_categories(path, i: int, img: dict, cats: set) -> None:
    """LVIS federated evaluation reads these lists; an unknown id there fails only at eval time."""
    for field in ("neg_category_ids", "not_exhaustive_category_ids"):
        ids = img.get(field, [])
        if not isinstance(ids, list):
            raise record_error(path, "images", i, img, field, f"expected a list of category ids, got {_brief(ids)}")
        unknown = [c for c in ids if c not in cats]
        if unknown:
            raise record_error(path, "images", i, img, field, f"unknown category {_brief(unknown[0])}")


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


def fixed_val_subset(ann_file: str | Path, n: int, out_dir: str | Path) -> Path:
    """``ann_file`` itself when ``n`` is 0 or it has at most ``n`` images, else its fixed random
    ``n``-image subset (seed 0) written under ``out_dir``: the same images on every call."""
    if not n or len(_read_json(ann_file).get("images", [])) <= n:
        return Path(ann_file)
    return write_subset(ann_file, n, 0, subset_path(ann_file, n, 0, out_dir))
