"""COCO / LVIS evaluation of torchvision detectors, and drawings of what they found.

The metrics are the official COCO and LVIS ones, computed by faster-coco-eval (a C++
reimplementation of pycocotools' ``COCOeval`` with LVIS's federated mode; the tests check it
gives pycocotools' and lvis' numbers) on detections in the COCO results format, and reported as
the fractions (0..1) those tools give: ``bbox/AP`` is ``COCOeval.stats[0]``. A value of -1 means
the tool found no ground truth in that group (no small objects, no rare categories), exactly as
the tools report it.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pycocotools.mask as mask_utils
import torch
from faster_coco_eval import COCO as FasterCOCO
from faster_coco_eval import COCOeval_faster
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms.functional import to_pil_image
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from predet.engine.checkpoint import atomic_write
from predet.engine.distributed import broadcast_from_main, gather_to_main, get_rank, get_world_size, is_main_process
from predet.engine.preemption import ignore_ctrl_c

COCO_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
LVIS_KEYS = COCO_KEYS + ("APr", "APc", "APf")
LVIS_MAX_DETS = 300
# faster-coco-eval's names for LVIS_KEYS
LVIS_STATS = ("AP_all", "AP_50", "AP_75", "AP_small", "AP_medium", "AP_large", "APr", "APc", "APf")
PRED_COLOR = "red"
TRUE_COLOR = "lime"


# --------------------------------------------------------------------------- results format


def _encode_masks(masks: torch.Tensor) -> list[dict]:
    """Compressed RLE per mask, counts as str so the results can go straight into JSON."""
    array = np.asfortranarray(masks.numpy().astype(np.uint8).transpose(1, 2, 0))
    rles = mask_utils.encode(array)
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def predictions_to_results(
    outputs: Sequence[dict], image_ids: Sequence[Any], cat_ids: Sequence[int],
    masks: bool = True, mask_threshold: float = 0.5,
) -> list[dict]:
    """torchvision detector outputs -> COCO results (xywh boxes, dataset category ids, RLE).

    Label ``l`` (contiguous, 1..K) maps to ``cat_ids[l - 1]``; mask probabilities are cut at
    ``mask_threshold``. Segmentations are added only when ``masks`` and the output has them.
    """
    if len(outputs) != len(image_ids):
        raise ValueError(f"{len(outputs)} outputs but {len(image_ids)} image ids")
    results = []
    for output, image_id in zip(outputs, image_ids):
        boxes = output["boxes"].detach().float().cpu()
        labels = output["labels"].detach().cpu().tolist()
        scores = output["scores"].detach().float().cpu().tolist()
        if any(label < 1 or label > len(cat_ids) for label in labels):
            raise ValueError(f"labels must lie in 1..{len(cat_ids)}, got {sorted(set(labels))}")
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        rles = None
        if masks and "masks" in output and len(labels):
            binary = output["masks"].detach()[:, 0] > mask_threshold
            rles = _encode_masks(binary.cpu())
        for i, (box, label, score) in enumerate(zip(xywh, labels, scores)):
            result = {"image_id": int(image_id), "category_id": int(cat_ids[label - 1]),
                      "bbox": box, "score": score}
            if rles is not None:
                result["segmentation"] = rles[i]
            results.append(result)
    return results


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


# --------------------------------------------------------------------------- inference


def _base_dataset(dataset):
    """The dataset that carries ``cat_ids`` / ``coco`` / ``lvis``, under any Subset wrappers."""
    while not hasattr(dataset, "cat_ids") and hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    if not hasattr(dataset, "cat_ids"):
        raise AttributeError(f"{type(dataset).__name__} has no cat_ids")
    return dataset


def _collate(samples: list) -> dict:
    """The batch layout of the detection data module's ``collate_detection``; kept here so
    evaluation does not depend on the training data pipeline."""
    images, targets = zip(*samples)
    return {"images": list(images), "targets": list(targets), "num_images": len(images)}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class _Inference:
    results: list[dict] = field(default_factory=list)
    image_ids: list[int] = field(default_factory=list)
    has_masks: bool = False
    stats: dict = field(default_factory=dict)


@contextlib.contextmanager
def _eval_mode(model):
    """Eval mode for the pass, then the caller's mode back: a periodic evaluation in the
    middle of training must not leave the detector returning detections instead of losses."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _run_batches(model, batches, device, cat_ids, progress: bool, total: int | None = None) -> list[tuple]:
    """(results, image ids, masks came out) of each batch, in the order the loader gives them."""
    from tqdm.auto import tqdm

    out = []
    for batch in tqdm(batches, desc="eval", disable=not progress, leave=False, total=total):
        images = [image.to(device, non_blocking=True) for image in batch["images"]]
        outputs = model(images)
        ids = [int(target["image_id"]) for target in batch["targets"]]
        out.append((predictions_to_results(outputs, ids, cat_ids), ids,
                    any("masks" in output for output in outputs)))
    return out


def _merge(parts: list[tuple], seconds: float) -> _Inference:
    run = _Inference()
    for results, ids, masks in parts:
        run.results.extend(results)
        run.image_ids.extend(ids)
        run.has_masks |= masks
    n = len(run.image_ids)
    run.stats = {"images": n, "seconds": seconds, "images_per_s": n / seconds if seconds > 0 else 0.0}
    return run


@torch.no_grad()
def _infer(model, loader, device, progress: bool) -> _Inference:
    """One pass over ``loader`` in this process, remembering which images ran and whether
    masks came out."""
    device = torch.device(device)
    cat_ids = _base_dataset(loader.dataset).cat_ids
    with _eval_mode(model):
        _synchronize(device)
        start = time.perf_counter()
        parts = _run_batches(model, loader, device, cat_ids, progress)
        _synchronize(device)
        seconds = time.perf_counter() - start
    return _merge(parts, seconds)


def run_inference(model, loader, device, progress: bool = True) -> tuple[list[dict], dict]:
    """Detections for every image of ``loader`` in COCO results format, plus throughput
    (``images``, ``seconds``, ``images_per_s``; the time includes data loading). The model
    runs in eval mode and gets its previous mode back afterwards."""
    run = _infer(model, loader, device, progress)
    return run.results, run.stats


def shard_batches(num_items: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """The fixed batches of a pass over ``num_items`` items that this rank runs: batch k on
    rank k % world_size. Every image is then run in the same batch (the same padding) as in one
    process, so the detections, and the scores, are the same for any number of processes."""
    return list(range(rank, math.ceil(num_items / batch_size), world_size))


@torch.no_grad()
def inference_on_dataset(model, dataset, device="cpu", batch_size: int = 2, num_workers: int = 0,
                         progress: bool = True, collate_fn=None) -> _Inference:
    """Detections for every image of ``dataset``, in dataset order, on rank 0; every rank of a
    distributed run takes part (a collective) and runs its share of the batches, with
    ``num_workers`` loader workers. Other ranks get their own share's count in ``stats`` and no
    detections (rank 0 scores them)."""
    device = torch.device(device)
    rank, world = get_rank(), get_world_size()
    mine = shard_batches(len(dataset), batch_size, rank, world)
    index = [list(range(k * batch_size, min((k + 1) * batch_size, len(dataset)))) for k in mine]
    loader = DataLoader(dataset, batch_sampler=index, num_workers=num_workers if index else 0,
                        collate_fn=collate_fn or _collate, pin_memory=device.type == "cuda",
                        worker_init_fn=ignore_ctrl_c)
    cat_ids = _base_dataset(dataset).cat_ids
    with _eval_mode(model):
        _synchronize(device)
        start = time.perf_counter()
        parts = _run_batches(model, loader if index else [], device, cat_ids, progress and rank == 0, len(index))
        _synchronize(device)
        gathered = gather_to_main(list(zip(mine, parts)))
        seconds = time.perf_counter() - start
    if gathered is None:
        return _merge(parts, seconds)
    ordered = sorted((p for part in gathered for p in part), key=lambda p: p[0])
    return _merge([p for _, p in ordered], seconds)


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
    base = _base_dataset(dataset)
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


# --------------------------------------------------------------------------- drawings


def _to_uint8(image: torch.Tensor) -> torch.Tensor:
    if image.dtype == torch.uint8:
        return image.cpu()
    return (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)


def _label_text(label: int, category_names: Sequence[str]) -> str:
    return category_names[label - 1] if 1 <= label <= len(category_names) else str(label)


def _cpu(tensor):
    return None if tensor is None else tensor.detach().cpu()


def _draw(canvas, boxes, labels, masks, color, width):
    """Masks first, boxes over them, so the labels stay readable."""
    if len(boxes) == 0:
        return canvas
    if masks is not None and len(masks):
        canvas = draw_segmentation_masks(canvas, masks.bool(), alpha=0.4, colors=color)
    return draw_bounding_boxes(canvas, boxes.float(), labels=labels, colors=color, width=width)


def draw_detections(
    image: torch.Tensor, prediction: dict, target: dict | None, category_names: Sequence[str],
    score_threshold: float = 0.5,
) -> Image.Image:
    """The image with ground truth (lime, ``gt:`` labels) and the predictions scoring at least
    ``score_threshold`` (red, name and score) drawn over it, for eyeballing a detector."""
    canvas = _to_uint8(image)
    if target is not None:
        labels = [f"gt: {_label_text(int(l), category_names)}" for l in target["labels"]]
        canvas = _draw(canvas, target["boxes"].cpu(), labels, _cpu(target.get("masks")),
                       TRUE_COLOR, width=2)
    keep = prediction["scores"].detach().cpu() >= score_threshold
    boxes = prediction["boxes"].detach().cpu()[keep]
    labels = [f"{_label_text(int(l), category_names)} {float(s):.2f}"
              for l, s in zip(prediction["labels"].cpu()[keep], prediction["scores"].cpu()[keep])]
    masks = prediction.get("masks")
    if masks is not None:
        masks = masks.detach().cpu()[keep][:, 0] > 0.5
    canvas = _draw(canvas, boxes, labels, masks, PRED_COLOR, width=2)
    return to_pil_image(canvas)


@torch.no_grad()
def visualize(
    model, dataset, num_images: int, out_dir, device="cpu", score_threshold: float = 0.5,
) -> list[Path]:
    """Draw the first ``num_images`` images of ``dataset`` with predictions and ground truth
    into ``out_dir/vis_{image_id}.png``; returns the written paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = _base_dataset(dataset).category_names
    model.to(device)
    paths = []
    with _eval_mode(model):
        for index in range(min(num_images, len(dataset))):
            image, target = dataset[index]
            prediction = model([image.to(device)])[0]
            drawing = draw_detections(image, prediction, target, names, score_threshold)
            path = out_dir / f"vis_{int(target['image_id'])}.png"
            drawing.save(path)
            paths.append(path)
    return paths


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
