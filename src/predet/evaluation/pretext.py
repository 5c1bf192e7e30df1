"""Pretext-task diagnostics: is each part of pre-training actually learning?

Measured on held-out images, without random sampling so they are comparable across
iterations, and each beside the floor it must beat (method.md §2.7):

* weak-label mAP over the vocabulary on whole images against their true tags, vs a constant
  predictor;
* CRPN recall@0.5 (does the top box for query q overlap ``b2[q]`` with IoU >= 0.5?), vs the
  same recall with another query's box and vs the best single fixed anchor;
* contrastive top-1 (among the view-2 boxes of every query in the batch, is the most similar
  one a positive for q?) on views with decorrelated colours, vs chance.
"""

from __future__ import annotations

import logging

import torch
from torch.utils.data import DataLoader
from torchvision.ops import box_iou

from predet.engine.distributed import (
    broadcast_from_main,
    gather_to_main,
    move_to_device,
)
from predet.engine.preemption import ignore_ctrl_c
from predet.evaluation.inference import eval_mode
from predet.modeling.predet.crpn import pairwise_iou

logger = logging.getLogger(__name__)


def recall_at_iou(pred: torch.Tensor, target: torch.Tensor, threshold: float = 0.5) -> float:
    """Fraction of (..., 4) predictions overlapping their target with IoU >= threshold."""
    return (pairwise_iou(pred, target) >= threshold).float().mean().item()


def top1_accuracy(sim: torch.Tensor, positive: torch.Tensor) -> float:
    """Fraction of rows whose most similar column is one of their positives."""
    return positive.gather(1, sim.argmax(1, keepdim=True)).float().mean().item()


def chance_top1(positive: torch.Tensor) -> float:
    """Top-1 accuracy of a uniformly random choice: the floor ``top1_accuracy`` must beat."""
    return positive.float().mean(1).mean().item()


def other_query_boxes(boxes: torch.Tensor) -> torch.Tensor:
    """(N, Q, 4) -> each query's box replaced by the next query's of the same image.

    Scoring query q with query q+1's proposal is the floor of the CRPN recall: a CRPN that
    ignores its query (proposes the same salient boxes for every query) scores as well there.
    """
    return boxes.roll(1, dims=1)


def best_fixed_anchor_recall(anchors: torch.Tensor, targets: torch.Tensor, threshold: float = 0.5) -> float:
    """Recall of the single anchor that is right most often (chosen on the same targets):
    what a CRPN gets by always answering with one box, whatever the query."""
    hits = box_iou(targets.reshape(-1, 4), anchors) >= threshold  # (N*Q, A)
    return hits.float().mean(0).max().item()


def average_precision(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-class AP (non-interpolated, as in VOC/sklearn) of (M, C) scores vs multi-hot
    targets; NaN for a class without positives."""
    order = scores.argsort(dim=0, descending=True)
    hits = targets.gather(0, order).float()
    precision = hits.cumsum(0) / torch.arange(1, len(hits) + 1, device=hits.device)[:, None]
    positives = hits.sum(0)
    return torch.where(positives > 0, (precision * hits).sum(0) / positives.clamp(min=1), torch.nan)


def mean_average_precision(scores: torch.Tensor, targets: torch.Tensor) -> float:
    return average_precision(scores, targets).nanmean().item()


def constant_predictor_map(targets: torch.Tensor) -> float:
    """mAP of a score that ignores the image (every image ties): each class's AP is then its
    frequency, the floor a weak-label head must beat."""
    freq = targets.float().mean(0)
    return freq[freq > 0].mean().item()


@torch.no_grad()
def pretext_predictions(model, batch: dict) -> dict:
    """The CRPN's top box per query and the query-vs-target similarity matrix."""
    (view1, view2), b1, b2 = model.views(batch), batch["b1"], batch["b2"]
    n, q = b1.shape[:2]
    size = tuple(view1.shape[-2:])
    _, fpn = model.features(view1, view2)
    fpn1, fpn2 = model.split_views(fpn, n)
    z = model.embed_boxes(fpn1, b1, size)
    trunk, dw, db, scores = model.query_scores(fpn2, z, n)
    anchors, real = model.anchors(view2, fpn2), model.anchor_validity(view2, fpn2)
    boxes, _ = model.proposals(trunk, dw, db, scores, anchors, size, 1, real)
    targets = model.embed_boxes(fpn2, b2, size)
    sim = model.roi_head.similarity(model.roi_head.embed(z), model.roi_head.embed(targets))
    image = torch.arange(n, device=b2.device).repeat_interleave(q)
    flat = b2.reshape(-1, 4)
    positive = (box_iou(flat, flat) >= model.roi_head.pos_iou) & (image[:, None] == image[None, :])
    return {"top_box": boxes[:, :, 0], "sim": sim, "positive": positive, "anchors": anchors if real is None else anchors[real]}


def pretext_values(model, batch: dict) -> dict[str, float]:
    """One held-out batch's CRPN recall@0.5 and contrastive top-1, each beside its floor:
    recall with another query's box and with the best fixed anchor; top-1 by chance."""
    out = pretext_predictions(model, batch)
    b2 = batch["b2"]
    return {
        "crpn_recall@0.5": recall_at_iou(out["top_box"], b2),
        "crpn_recall@0.5_other_query": recall_at_iou(other_query_boxes(out["top_box"]), b2),
        "crpn_recall@0.5_best_anchor": best_fixed_anchor_recall(out["anchors"], b2),
        "nce_top1": top1_accuracy(out["sim"], out["positive"]),
        "nce_top1_chance": chance_top1(out["positive"]),
    }


def mean_over_batches(values: list[dict[str, float]]) -> dict:
    """``pretext/NAME``: each signal's mean over the batches (every batch weighs the same)."""
    if not values:
        return {}
    return {f"pretext/{k}": sum(v[k] for v in values) / len(values) for k in values[0]}


def weak_label_signals(scores: torch.Tensor, targets: torch.Tensor) -> dict:
    """Held-out weak-label mAP over the vocabulary (whole images, true tags) and its floor."""
    return {"pretext/cls_mAP": mean_average_precision(scores, targets),
            "pretext/cls_mAP_constant": constant_predictor_map(targets)}


@torch.no_grad()
def weak_label_scores(model, batch: dict) -> torch.Tensor:
    c5, _ = model.features(batch["image"], fpn=False)
    return model.cls_head(c5).float()


def fixed_batches(keys: list, batch_size: int) -> list[list]:
    """``keys`` cut into consecutive batches: the same batches for any number of processes."""
    return [keys[i:i + batch_size] for i in range(0, len(keys), batch_size)]


class PretextDiagnosticsHook:
    """Logs the pretext diagnostics on fixed held-out data every ``period`` iterations.

    ``pairs``: a map-style set of two-view samples, read as ``pairs[(i, 10_000 + i)]`` (fixed
    seeds, so every evaluation sees the same views) for its first ``num_pairs`` items.
    ``images``: whole images with their true tags, for the weak-label mAP (optional). Both are
    bounded and decoded when read, by loader workers, never kept in memory; their fixed batches
    are shared out over the ranks (batch k on rank k % world), the per-batch results gathered on
    rank 0 and combined in batch order, so any number of processes logs the same numbers.
    """

    def __init__(self, pairs, collate, period: int, num_pairs: int = 32, batch_size: int = 8, images=None,
                 collate_images=None, image_batch_size: int = 32, num_workers: int = 0):
        count = min(num_pairs, len(pairs))
        self.pairs, self.images = pairs, images
        self.pair_batches = fixed_batches([(i, 10_000 + i) for i in range(count)], batch_size)
        self.image_batches = [] if images is None else fixed_batches(list(range(len(images))), image_batch_size)
        self.collate, self.collate_images = collate, collate_images
        self.period, self.num_workers = period, num_workers
        self.last = {}

    def _my_batches(self, dataset, batches, collate, device, rank: int, world: int):
        """(k, batch on ``device``) for the batches k of this rank."""
        mine = list(range(rank, len(batches), world))
        if not mine:
            return
        loader = DataLoader(dataset, batch_sampler=[batches[k] for k in mine], collate_fn=collate,
                            num_workers=self.num_workers, pin_memory=device.type == "cuda",
                            worker_init_fn=ignore_ctrl_c)
        for k, batch in zip(mine, loader):
            yield k, move_to_device(batch, device)

    @torch.no_grad()
    def run(self, model, device, rank: int = 0, world: int = 1) -> dict:
        """A collective when ``world`` > 1: every rank must call it; every rank gets the result."""
        device = torch.device(device)
        with eval_mode(model):
            pretext = [(k, pretext_values(model, b))
                       for k, b in self._my_batches(self.pairs, self.pair_batches, self.collate, device, rank, world)
                       if b.get("num_images")]
            weak = [(k, weak_label_scores(model, b).cpu(), b["labels"].cpu())
                    for k, b in self._my_batches(self.images, self.image_batches, self.collate_images, device,
                                                 rank, world) if b.get("num_images")]
        parts = gather_to_main((pretext, weak))
        result = None
        if parts is not None:
            pretext = sorted((p for part, _ in parts for p in part), key=lambda p: p[0])
            weak = sorted((w for _, part in parts for w in part), key=lambda w: w[0])
            result = mean_over_batches([v for _, v in pretext])
            if weak:
                result.update(weak_label_signals(torch.cat([s for _, s, _ in weak]),
                                                 torch.cat([t for _, _, t in weak])))
        self.last = broadcast_from_main(result)
        return self.last

    def before_train(self, state):
        """A kill between a checkpoint and its evaluation lost that record: redo it on resume
        (rank 0 reads the log and decides for all ranks, since the evaluation is collective)."""
        it = state.start_iter
        if it == 0 or it % self.period:
            return
        from predet.engine.metrics import METRICS_FILE, read_metrics

        path = state.run_dir / METRICS_FILE
        done = state.rank == 0 and path.is_file() and any(
            r.get("iteration") == it and any(k.startswith("pretext/") for k in r)
            for r in read_metrics(path))
        if not broadcast_from_main(done):
            self.after_step(state)

    def after_step(self, state):
        if state.iteration % self.period == 0 or state.iteration == state.max_iters:
            result = self.run(state.model, state.device, state.rank, state.world_size)
            state.metrics.update(result)
            state.writer.write({"iteration": state.iteration, **result})
            logger.info("iter %d  held-out pretext signals (floor in brackets): %s", state.iteration,
                        format_signals(result))


FLOORS = {  # signal -> the floors it must beat
    "crpn_recall@0.5": ("crpn_recall@0.5_other_query", "crpn_recall@0.5_best_anchor"),
    "nce_top1": ("nce_top1_chance",),
    "cls_mAP": ("cls_mAP_constant",),
}


def format_signals(result: dict) -> str:
    """``cls_mAP 0.61 (0.25)  crpn_recall@0.5 0.40 (0.02, 0.04) ...`` for the log."""
    parts = []
    for name, floors in FLOORS.items():
        if f"pretext/{name}" in result:
            ref = ", ".join(f"{result[f'pretext/{f}']:.3f}" for f in floors if f"pretext/{f}" in result)
            parts.append(f"{name} {result[f'pretext/{name}']:.3f} ({ref})")
    return "  ".join(parts)
