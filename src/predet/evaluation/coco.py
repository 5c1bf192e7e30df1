"""COCO / LVIS metrics of torchvision detectors: scoring detections, scoring a whole data set
(``evaluate_dataset_full``: sharded inference, then the metrics and AP per category on rank 0),
and the results files (``results.json``, COCO results format).

The metrics are the official COCO and LVIS ones, computed by faster-coco-eval (a C++
reimplementation of pycocotools' ``COCOeval`` with LVIS's federated mode; the tests check it
gives pycocotools' and lvis' numbers) on detections in the COCO results format, and reported as
the fractions (0..1) those tools give: ``bbox/AP`` is ``COCOeval.stats[0]``. A value of -1 means
the tool found no ground truth in that group (no small objects, no rare categories), exactly as
the tools report it.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from faster_coco_eval import COCO as FasterCOCO
from faster_coco_eval import COCOeval_faster

from predet.checkpoint.atomic import atomic_write
from predet.engine.distributed import (
    broadcast_from_main,
    is_main_process,
)
from predet.evaluation.inference import base_dataset, inference_on_dataset

COCO_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
LVIS_KEYS = COCO_KEYS + ("APr", "APc", "APf")
LVIS_MAX_DETS = 300
# faster-coco-eval's names for LVIS_KEYS
LVIS_STATS = ("AP_all", "AP_50", "AP_75", "AP_small", "AP_medium", "AP_large", "APr", "APc", "APf")


# --------------------------------------------------------------------------- results format


def _results_for(results: list[dict], iou_type: str) -> list[dict]:
    """Fresh copies for one IoU type (the eval APIs write into what they are given).

    For ``segm`` the box is dropped, as Detectron2 does: with a box present both APIs take
    the box area as the detection's area, which would sort masks into the wrong size range.
    """
    if iou_type == "bbox":
        return [dict(r) for r in results]
    if not all("segmentation" in r for r in results):
        raise ValueError("segm evaluation needs a 'segmentation' in every result")
    return [{k: v for k, v in r.items() if k != "bbox"} for r in results]


def _limit_per_image(results: list[dict], max_dets: int) -> list[dict]:
    """Keep each image's ``max_dets`` highest-scoring detections (LVIS allows 300)."""
    by_image = defaultdict(list)
    for r in results:
        by_image[r["image_id"]].append(r)
    kept = []
    for dets in by_image.values():
        kept.extend(sorted(dets, key=lambda r: r["score"], reverse=True)[:max_dets])
    return kept


# --------------------------------------------------------------------------- COCO / LVIS


def _zeros(iou_types: Iterable[str], keys: Sequence[str]) -> dict:
    return {f"{t}/{k}": 0.0 for t in iou_types for k in keys}


def _category_ap(precision: np.ndarray, cat_ids: Sequence[int]) -> dict[int, float]:
    """AP of each category from the tools' precision array (IoU x recall x category x area
    [x max dets]): all areas, the most detections; -1 where the category has no ground truth."""
    out = {}
    for k, cat_id in enumerate(cat_ids):
        p = precision[:, :, k, 0]
        p = p[..., -1] if p.ndim == 3 else p
        valid = p[p > -1]
        out[int(cat_id)] = float(valid.mean()) if valid.size else -1.0
    return out


def faster_gt(gt):
    """A faster-coco-eval index over ``gt`` (a pycocotools COCO, or already a faster one),
    built once per ground truth. Its own copy of the records: evaluation writes into them."""
    if isinstance(gt, FasterCOCO):
        return gt
    cached = getattr(gt, "_predet_faster_gt", None)
    if cached is None:
        cached = FasterCOCO(gt.dataset, use_deepcopy=True)
        gt._predet_faster_gt = cached
    return cached


def _run_eval(gt, results: list[dict], iou_type: str, img_ids, verbose: bool, lvis: bool):
    """One faster-coco-eval pass (evaluate, accumulate, summarize) over fresh copies of ``results``."""
    gt = faster_gt(gt)
    quiet = (lambda *args, **kwargs: None) if not verbose else print
    gt.print_function = quiet
    dt = gt.loadRes(_results_for(results, iou_type))
    evaluator = COCOeval_faster(gt, dt, iou_type, lvis_style=lvis, print_function=quiet)
    if lvis:
        evaluator.params.maxDets = [LVIS_MAX_DETS]
    if img_ids is not None:
        evaluator.params.imgIds = sorted(int(i) for i in img_ids)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return evaluator


def evaluate_coco(
    coco_gt, results: list[dict], iou_types: Sequence[str] = ("bbox", "segm"),
    img_ids: Sequence[int] | None = None, verbose: bool = False, per_category: dict | None = None,
) -> dict:
    """COCO AP / AP50 / AP75 / APs / APm / APl per IoU type, as ``"bbox/AP"`` etc.

    ``img_ids`` restricts the evaluation to the images actually run (a subset of the json);
    by default every image in ``coco_gt`` counts. No detections at all scores 0.0.
    ``per_category``, when given, receives ``{iou_type: {category id: AP}}``.
    """
    metrics = {}
    for iou_type in iou_types:
        if not results:
            metrics.update(_zeros([iou_type], COCO_KEYS))
            if per_category is not None:
                per_category[iou_type] = {int(c): 0.0 for c in coco_gt.getCatIds()}
            continue
        evaluator = _run_eval(coco_gt, results, iou_type, img_ids, verbose, lvis=False)
        metrics.update({f"{iou_type}/{k}": float(v) for k, v in zip(COCO_KEYS, evaluator.stats)})
        if per_category is not None:
            per_category[iou_type] = _category_ap(evaluator.eval["precision"], evaluator.params.catIds)
    return metrics


def evaluate_lvis(
    lvis_gt, results: list[dict], iou_types: Sequence[str] = ("bbox", "segm"),
    img_ids: Sequence[int] | None = None, verbose: bool = False, per_category: dict | None = None,
) -> dict:
    """LVIS AP / AP50 / AP75 / APs / APm / APl / APr / APc / APf per IoU type (federated:
    a category counts only on images where it is annotated or listed as absent).

    LVIS scores at most 300 detections per image: only the top-scoring 300 are kept.
    ``img_ids`` and ``per_category`` as in :func:`evaluate_coco`.
    """
    metrics = {}
    limited = _limit_per_image(results, LVIS_MAX_DETS)
    for iou_type in iou_types:
        if not limited:
            metrics.update(_zeros([iou_type], LVIS_KEYS))
            if per_category is not None:
                per_category[iou_type] = {int(c): 0.0 for c in lvis_gt.getCatIds()}
            continue
        evaluator = _run_eval(lvis_gt, limited, iou_type, img_ids, verbose, lvis=True)
        stats = evaluator.stats_as_dict
        metrics.update({f"{iou_type}/{k}": float(stats[name]) for k, name in zip(LVIS_KEYS, LVIS_STATS)})
        if per_category is not None:
            per_category[iou_type] = _category_ap(evaluator.eval["precision"], evaluator.params.catIds)
    return metrics


# --------------------------------------------------------------------------- scoring a data set


@dataclass
class Evaluation:
    """One evaluation: the summary metrics, AP per category (rows of ``category_id``, ``name``,
    ``bbox/AP`` [, ``segm/AP``]) and the detections in COCO results format."""

    metrics: dict
    per_category: list[dict]
    results: list[dict]


def per_category_rows(per_category: dict, cat_ids: Sequence[int], names: Sequence[str]) -> list[dict]:
    """``{iou_type: {cat id: AP}}`` -> one row per category, in the dataset's category order."""
    rows = []
    for cat_id, name in zip(cat_ids, names):
        row = {"category_id": int(cat_id), "name": name}
        row.update({f"{t}/AP": aps.get(int(cat_id), -1.0) for t, aps in per_category.items()})
        rows.append(row)
    return rows


def format_per_category(rows: list[dict]) -> str:
    """A Markdown table of per-category AP in percent ('-': no ground truth for it)."""
    if not rows:
        return ""
    keys = [k for k in rows[0] if k.endswith("/AP")]
    lines = ["| id | category | " + " | ".join(keys) + " |", "|---:|---|" + "---:|" * len(keys)]
    for row in rows:
        cells = [f"{100 * row[k]:.1f}" if row[k] >= 0 else "-" for k in keys]
        lines.append(f"| {row['category_id']} | {row['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def evaluate_dataset_full(
    model, dataset, device="cpu", batch_size: int = 2, num_workers: int = 0,
    progress: bool = True, collate_fn=None,
) -> Evaluation:
    """Run ``model`` over ``dataset`` and score it with LVIS metrics when the dataset has an
    ``lvis`` ground truth, else COCO metrics; mask AP only when the model outputs masks.
    Only the images of ``dataset`` count, so a subset of a json is scored fairly.

    In a distributed run every rank must call it: each runs its share of the images
    (:func:`inference_on_dataset`), rank 0 scores them, and every rank gets the metrics; the
    detections (``results``) are on rank 0 only."""
    base = base_dataset(dataset)
    if getattr(base, "lvis", None) is None and getattr(base, "coco", None) is None:
        raise AttributeError(f"{type(base).__name__} has neither a coco nor an lvis ground truth")
    model.to(device)
    run = inference_on_dataset(model, dataset, device, batch_size, num_workers, progress, collate_fn)
    scored = None
    if is_main_process():
        iou_types = ("bbox", "segm") if run.has_masks else ("bbox",)
        per_category: dict = {}
        score = evaluate_lvis if getattr(base, "lvis", None) is not None else evaluate_coco
        gt = base.lvis if getattr(base, "lvis", None) is not None else base.coco
        metrics = score(gt, run.results, iou_types, img_ids=run.image_ids, per_category=per_category)
        metrics["images_per_s"] = run.stats["images_per_s"]
        names = getattr(base, "category_names", [str(c) for c in base.cat_ids])
        scored = (metrics, per_category_rows(per_category, base.cat_ids, names))
    metrics, rows = broadcast_from_main(scored)
    return Evaluation(metrics, rows, run.results)


def evaluate_dataset(
    model, dataset, device="cpu", batch_size: int = 2, num_workers: int = 0,
    progress: bool = True, collate_fn=None,
) -> dict:
    """The metrics of :func:`evaluate_dataset_full` (periodic evaluations need no more)."""
    return evaluate_dataset_full(model, dataset, device, batch_size, num_workers, progress, collate_fn).metrics


# --------------------------------------------------------------------------- output


def _write_json(obj, path, **dump_kwargs) -> Path:
    """JSON written atomically: a reader never sees half a file, a crash keeps the previous one."""
    return atomic_write(path, lambda f: (json.dump(obj, f, **dump_kwargs), f.write("\n")), mode="w")


def write_results_json(metrics: dict, path) -> Path:
    """Write ``metrics`` as sorted, indented JSON, atomically."""
    return _write_json(metrics, path, sort_keys=True, indent=2, default=_jsonable)


RESULTS_FILE = "coco_instances_results.json"


def write_coco_results(results: list[dict], path) -> Path:
    """The standard COCO results file (``coco_instances_results.json``: image_id, category_id,
    xywh bbox, score and RLE segmentation), which COCO/LVIS tools and servers read."""
    return _write_json(results, path)


def _jsonable(value):
    """numpy / torch scalars come out of the eval tools; JSON needs plain numbers."""
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
