"""Evaluation speed: faster-coco-eval (what predet uses) against pycocotools, same detections.

A synthetic COCO-style set (random boxes and polygon masks in 80 categories, detections that
are jittered ground truth plus false positives, 100 per image) is scored by both tools, bbox
and segm; each timing is the whole call (loadRes, evaluate, accumulate, summarize), best of
``--repeats`` (interleaved). The stats must agree (max |difference| is reported). When the ``lvis`` package
is importable the LVIS federated numbers are compared with LVISEval the same way.

    python benchmarks/eval_speed.py > benchmarks/results/eval_speed.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import platform
import sys
import time

import numpy as np
import pycocotools.mask as mask_utils
from faster_coco_eval import COCO as FasterCOCO
from faster_coco_eval import COCOeval_faster
from faster_coco_eval import __version__ as faster_version
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

SIZE = 320


def polygon(rng, x, y, w, h) -> list[float]:
    """A convex-ish hexagon inside the box, so masks differ from boxes."""
    cx, cy = x + w / 2, y + h / 2
    angles = np.sort(rng.uniform(0, 2 * np.pi, 6))
    return [float(v) for a in angles for v in (cx + w / 2 * np.cos(a), cy + h / 2 * np.sin(a))]


def synthetic(images: int, categories: int, seed: int = 0):
    """Ground truth (COCO dict) and detections (COCO results with RLE masks)."""
    rng = np.random.default_rng(seed)
    gt = {"images": [], "annotations": [], "categories": [{"id": c + 1, "name": f"c{c}"} for c in range(categories)]}
    dets = []
    for image_id in range(1, images + 1):
        gt["images"].append({"id": image_id, "width": SIZE, "height": SIZE, "file_name": f"{image_id}.jpg"})
        objects = []  # (box, polygon, category) of what the detector reports
        for _ in range(rng.integers(3, 12)):
            w, h = rng.uniform(8, 160, 2)
            x, y = rng.uniform(0, SIZE - w), rng.uniform(0, SIZE - h)
            cat = int(rng.integers(1, categories + 1))
            poly = polygon(rng, x, y, w, h)
            rle = mask_utils.merge(mask_utils.frPyObjects([poly], SIZE, SIZE))
            box = [float(v) for v in mask_utils.toBbox(rle)]
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": image_id, "category_id": cat,
                                      "segmentation": [poly], "area": float(mask_utils.area(rle)),
                                      "bbox": box, "iscrowd": 0})
            dx, dy = rng.normal(0, 0.05, 2) * box[2:]  # found, a few pixels off
            objects.append(([box[0] + dx, box[1] + dy, box[2], box[3]],
                             [v + (dx if i % 2 == 0 else dy) for i, v in enumerate(poly)], cat))
        while len(objects) < 100:  # false positives, some in the right category
            w, h = rng.uniform(8, 160, 2)
            x, y = rng.uniform(0, SIZE - w), rng.uniform(0, SIZE - h)
            objects.append(([x, y, w, h], polygon(rng, x, y, w, h), int(rng.integers(1, categories + 1))))
        for box, poly, cat in objects:
            rle = mask_utils.merge(mask_utils.frPyObjects([poly], SIZE, SIZE))
            rle["counts"] = rle["counts"].decode("ascii")
            dets.append({"image_id": image_id, "category_id": cat, "bbox": [float(v) for v in box],
                         "score": float(rng.uniform(0.05, 1.0)), "segmentation": rle})
    return gt, dets


def for_type(dets, iou_type):
    if iou_type == "bbox":
        return [{k: v for k, v in d.items() if k != "segmentation"} for d in dets]
    return [{k: v for k, v in d.items() if k != "bbox"} for d in dets]


def run_pycocotools(gt: COCO, dets, iou_type):
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt, gt.loadRes(copy.deepcopy(dets)), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return list(ev.stats)


def run_faster(gt: FasterCOCO, dets, iou_type, lvis=False):
    quiet = lambda *a, **k: None  # noqa: E731
    gt.print_function = quiet
    ev = COCOeval_faster(gt, gt.loadRes(copy.deepcopy(dets)), iou_type, lvis_style=lvis, print_function=quiet)
    if lvis:
        ev.params.maxDets = [300]
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    if lvis:
        d = ev.stats_as_dict
        return [d[k] for k in ("AP_all", "AP_50", "AP_75", "AP_small", "AP_medium", "AP_large", "APr", "APc", "APf")]
    return list(ev.stats)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def compare(reference, faster, repeats):
    """Best of ``repeats`` for each, the two interleaved so load on a shared machine hits both."""
    t_ref, t_fast = [], []
    for _ in range(repeats):
        t, s_ref = timed(reference)
        t_ref.append(t)
        t, s_fast = timed(faster)
        t_fast.append(t)
    return {"reference_s": round(min(t_ref), 4), "faster_coco_eval_s": round(min(t_fast), 4),
            "ratio": round(min(t_fast) / min(t_ref), 4), "AP": s_fast[0],
            "max_abs_stat_difference": float(np.max(np.abs(np.array(s_ref) - np.array(s_fast))))}


def lvis_gt(gt: dict, seed: int = 0) -> dict:
    """The same set as LVIS v1: frequencies, and per image the absent (negative) categories."""
    rng = np.random.default_rng(seed)
    data = copy.deepcopy(gt)
    present = {}
    for ann in data["annotations"]:
        present.setdefault(ann["image_id"], set()).add(ann["category_id"])
    cats = [c["id"] for c in data["categories"]]
    for img in data["images"]:
        absent = [c for c in cats if c not in present.get(img["id"], set())]
        img["neg_category_ids"] = sorted(rng.choice(absent, size=min(10, len(absent)), replace=False).tolist())
        img["not_exhaustive_category_ids"] = sorted(list(present.get(img["id"], set()))[:1])
        img["coco_url"] = f"http://x/val2017/{img['id']}.jpg"
    for c in data["categories"]:
        c.update(frequency="rcf"[c["id"] % 3], synset=c["name"], synonyms=[c["name"]], image_count=1, instance_count=1)
    for ann in data["annotations"]:
        ann.pop("iscrowd")
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--categories", type=int, default=80)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    gt, dets = synthetic(args.images, args.categories)
    with contextlib.redirect_stdout(io.StringIO()):
        pyc = COCO()
        pyc.dataset = copy.deepcopy(gt)
        pyc.createIndex()
    fast = FasterCOCO(copy.deepcopy(gt), use_deepcopy=True)
    out = {"command": "python benchmarks/eval_speed.py " + " ".join(sys.argv[1:]),
           "images": args.images, "categories": args.categories, "detections": len(dets),
           "repeats": args.repeats, "cpu_count": os.cpu_count(), "python": platform.python_version(),
           "faster_coco_eval": faster_version, "reference": "pycocotools COCOeval", "coco": {}}
    for iou_type in ("bbox", "segm"):
        d = for_type(dets, iou_type)
        out["coco"][iou_type] = compare(lambda: run_pycocotools(pyc, d, iou_type), lambda: run_faster(fast, d, iou_type),
                                        args.repeats)
    try:
        import lvis  # the reference implementation; optional, predet no longer needs it
    except ImportError:
        out["lvis"] = "lvis package not installed: LVIS comparison skipped"
    else:
        out["lvis"] = lvis_compare(lvis_gt(gt), dets, args.repeats)
    print(json.dumps(out, indent=1))


def lvis_compare(gt: dict, dets, repeats) -> dict:
    import logging

    import lvis
    from lvis import LVIS, LVISEval, LVISResults

    logging.getLogger("lvis").setLevel(logging.ERROR)
    if "float" not in np.__dict__:
        np.float = float  # lvis 0.5.3 still calls np.float
    ref_gt = LVIS.__new__(LVIS)
    ref_gt.logger = logging.getLogger("lvis.lvis")
    ref_gt.dataset = copy.deepcopy(gt)
    ref_gt._create_index()
    fast = FasterCOCO(copy.deepcopy(gt), use_deepcopy=True)
    keys = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")
    out = {"reference": f"lvis {getattr(lvis, '__version__', '0.5.3')} LVISEval"}
    for iou_type in ("bbox", "segm"):
        d = for_type(dets, iou_type)

        def reference():
            ev = LVISEval(ref_gt, LVISResults(ref_gt, copy.deepcopy(d), max_dets=300), iou_type)
            ev.run()
            return [ev.get_results()[k] for k in keys]

        out[iou_type] = compare(reference, lambda: run_faster(fast, d, iou_type, lvis=True), repeats)
    return out


if __name__ == "__main__":
    main()
