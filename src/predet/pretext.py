"""Pretext-task diagnostics: is the detection pretext actually being learned?

Two numbers on held-out image pairs, both without random sampling so they are comparable
across iterations: the CRPN's recall (does its best box for query q overlap ``b2[q]`` with
IoU >= 0.5?) and the contrastive top-1 accuracy (among the view-2 boxes of every query in the
batch, is the most similar one a positive for q?).
"""

from __future__ import annotations

import logging

import torch
from torchvision.ops import box_iou

from predet.models.contrastive import pairwise_iou
from predet.engine.trainer import move_to_device

logger = logging.getLogger(__name__)


def recall_at_iou(pred: torch.Tensor, target: torch.Tensor, threshold: float = 0.5) -> float:
    """Fraction of (..., 4) predictions overlapping their target with IoU >= threshold."""
    return (pairwise_iou(pred, target) >= threshold).float().mean().item()


def top1_accuracy(sim: torch.Tensor, positive: torch.Tensor) -> float:
    """Fraction of rows whose most similar column is one of their positives."""
    return positive.gather(1, sim.argmax(1, keepdim=True)).float().mean().item()


@torch.no_grad()
def pretext_predictions(model, batch: dict) -> dict:
    """The CRPN's top box per query and the query-vs-target similarity matrix."""
    view1, view2, b1, b2 = batch["view1"], batch["view2"], batch["b1"], batch["b2"]
    n, q = b1.shape[:2]
    size = tuple(view1.shape[-2:])
    _, fpn = model.features(torch.cat([view1, view2]))
    fpn1, fpn2 = model.split_views(fpn, n)
    z = model.embed_boxes(fpn1, b1, size)
    trunk, dw, db, scores = model.query_scores(fpn2, z, n)
    boxes, _ = model.proposals(trunk, dw, db, scores, model.anchors(view2, fpn2), size, 1)
    targets = model.embed_boxes(fpn2, b2, size)
    sim = model.roi_head.embed(z) @ model.roi_head.embed(targets).T
    image = torch.arange(n, device=b2.device).repeat_interleave(q)
    flat = b2.reshape(-1, 4)
    positive = (box_iou(flat, flat) >= model.roi_head.pos_iou) & (image[:, None] == image[None, :])
    return {"top_box": boxes[:, :, 0], "sim": sim, "positive": positive}


@torch.no_grad()
def evaluate_pretext(model, batches) -> dict:
    """Mean CRPN recall@0.5 and contrastive top-1 accuracy over held-out batches."""
    recall, accuracy, count = 0.0, 0.0, 0
    for batch in batches:
        if not batch.get("num_images"):
            continue
        out = pretext_predictions(model, batch)
        recall += recall_at_iou(out["top_box"], batch["b2"])
        accuracy += top1_accuracy(out["sim"], out["positive"])
        count += 1
    if count == 0:
        return {}
    return {"pretext/crpn_recall@0.5": recall / count, "pretext/nce_top1": accuracy / count}


def _part(name: str) -> str:
    """``backbone.body.layer3.1.conv2.weight`` -> ``backbone.body.layer3``; stem = conv1."""
    parts = name.split(".")
    return ".".join(parts[:3]) if parts[:2] == ["backbone", "body"] else ".".join(parts[:2])


@torch.no_grad()
def weight_change(checkpoint) -> dict[str, float]:
    """Relative distance ||w - w0|| / ||w0|| of each part's conv/linear weights from the run's init.

    Rebuilds the initialisation from the checkpoint's own config and seed. A pre-training whose
    backbone barely moved cannot change fine-tuning much; one that rewrote mainly the stem
    (``backbone.body.conv1``) has learned low-level cues such as colour.
    """
    from predet.config import from_dict
    from predet.engine.checkpoint import load_checkpoint
    from predet.pretrain import PretrainConfig, build_pretrain_model  # pretrain imports this module

    state = load_checkpoint(checkpoint)
    cfg = from_dict(PretrainConfig, state["config"])
    init = build_pretrain_model(cfg, len(state["extra_state"]["vocab"])).state_dict()
    moved, norm = {}, {}
    for name, w in state["model"].items():
        if name not in init or not w.is_floating_point() or w.dim() < 2:
            continue  # norms' affine parameters and running statistics are not features
        part = _part(name)
        moved[part] = moved.get(part, 0.0) + float((w.float() - init[name].float()).pow(2).sum())
        norm[part] = norm.get(part, 0.0) + float(init[name].float().pow(2).sum())
    return {part: (moved[part] / norm[part]) ** 0.5 if norm[part] else float("nan") for part in moved}


class PretextDiagnosticsHook:
    """Logs the pretext diagnostics on a fixed held-out set every ``period`` iterations."""

    def __init__(self, dataset, collate, period: int, num_images: int = 32, batch_size: int = 8):
        count = min(num_images, len(dataset))
        # Fixed (index, seed) pairs: the same views every time, so curves are comparable.
        self.batches = [
            collate([dataset[(i, 10_000 + i)] for i in range(start, min(start + batch_size, count))])
            for start in range(0, count, batch_size)
        ]
        self.period = period
        self.last = {}

    def run(self, model, device) -> dict:
        was_training = model.training
        model.eval()
        self.last = evaluate_pretext(model, (move_to_device(b, device) for b in self.batches))
        model.train(was_training)
        return self.last

    def before_train(self, state):
        """A kill between a checkpoint and its evaluation lost that record: redo it on resume."""
        it = state.start_iter
        if state.rank != 0 or it == 0 or it % self.period:
            return
        from predet.engine.metrics import METRICS_FILE, read_metrics

        path = state.run_dir / METRICS_FILE
        done = path.is_file() and any(
            r.get("iteration") == it and any(k.startswith("pretext/") for k in r)
            for r in read_metrics(path))
        if not done:
            self.after_step(state)

    def after_step(self, state):
        if state.rank == 0 and (state.iteration % self.period == 0 or state.iteration == state.max_iters):
            result = self.run(state.model, state.device)
            state.metrics.update(result)
            state.writer.write({"iteration": state.iteration, **result})
            logger.info("iter %d  pretext on held-out pairs: %s", state.iteration,
                        "  ".join(f"{k.split('/')[1]} {v:.3f}" for k, v in result.items()))
