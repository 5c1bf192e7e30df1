"""Running a detector over a data set, sharded over ranks: batch k on rank k % world, every
rank's detections gathered in batch order on rank 0, so any number of processes gives the same
results; timing per image."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pycocotools.mask as mask_utils
import torch
from torch.utils.data import DataLoader

from predet.data.coco import collate_detection
from predet.engine.distributed import (
    gather_to_main,
    get_rank,
    get_world_size,
)
from predet.engine.preemption import ignore_ctrl_c


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


def base_dataset(dataset):
    """The dataset that carries ``cat_ids`` / ``coco`` / ``lvis``, under any Subset wrappers."""
    while not hasattr(dataset, "cat_ids") and hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    if not hasattr(dataset, "cat_ids"):
        raise AttributeError(f"{type(dataset).__name__} has no cat_ids")
    return dataset


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class InferenceRun:
    results: list[dict] = field(default_factory=list)
    image_ids: list[int] = field(default_factory=list)
    has_masks: bool = False
    stats: dict = field(default_factory=dict)


@contextlib.contextmanager
def eval_mode(model):
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


def _merge(parts: list[tuple], seconds: float) -> InferenceRun:
    run = InferenceRun()
    for results, ids, masks in parts:
        run.results.extend(results)
        run.image_ids.extend(ids)
        run.has_masks |= masks
    n = len(run.image_ids)
    run.stats = {"images": n, "seconds": seconds, "images_per_s": n / seconds if seconds > 0 else 0.0}
    return run


@torch.no_grad()
def _infer(model, loader, device, progress: bool) -> InferenceRun:
    """One pass over ``loader`` in this process, remembering which images ran and whether
    masks came out."""
    device = torch.device(device)
    cat_ids = base_dataset(loader.dataset).cat_ids
    with eval_mode(model):
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
                         progress: bool = True, collate_fn=None) -> InferenceRun:
    """Detections for every image of ``dataset``, in dataset order, on rank 0; every rank of a
    distributed run takes part (a collective) and runs its share of the batches, with
    ``num_workers`` loader workers. Other ranks get their own share's count in ``stats`` and no
    detections (rank 0 scores them)."""
    device = torch.device(device)
    rank, world = get_rank(), get_world_size()
    mine = shard_batches(len(dataset), batch_size, rank, world)
    index = [list(range(k * batch_size, min((k + 1) * batch_size, len(dataset)))) for k in mine]
    loader = DataLoader(dataset, batch_sampler=index, num_workers=num_workers if index else 0,
                        collate_fn=collate_fn or collate_detection, pin_memory=device.type == "cuda",
                        worker_init_fn=ignore_ctrl_c)
    cat_ids = base_dataset(dataset).cat_ids
    with eval_mode(model):
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
