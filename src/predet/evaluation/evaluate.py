"""Scoring fine-tuned detectors: the periodic validation of a run (a trainer hook), one line per
evaluation in ``evals.jsonl``, and ``predet eval`` on a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

from predet.config.base import ConfigError
from predet.config.finetune import FinetuneConfig
from predet.data.coco import build_detection_dataset
from predet.data.coco_json import AnnotationError
from predet.engine.distributed import barrier
from predet.engine.launch import launched
from predet.engine.runfolder import check_writable, fresh_output
from predet.evaluation.coco import (
    RESULTS_FILE,
    Evaluation,
    evaluate_dataset_full,
    write_coco_results,
    write_results_json,
)
from predet.evaluation.visualize import visualize
from predet.modeling.detectors import load_detector


def evaluate(detector, dataset, cfg: FinetuneConfig, device, progress: bool = False) -> Evaluation:
    """``dataset`` scored with the run's evaluation settings: every rank runs its share."""
    return evaluate_dataset_full(detector, dataset, device, cfg.eval.batch_size, cfg.eval.num_workers,
                                 progress=progress)


class PeriodicEvaluation:
    """Evaluates on the validation split every ``period`` iterations, on every rank (each runs its
    share of the images): metrics and per-category AP to evals.jsonl, detections to
    ``inference/val_iterNNNNNNN/`` as a COCO results file (rank 0 writes)."""

    def __init__(self, dataset, cfg: FinetuneConfig, period: int):
        self.dataset, self.cfg, self.period = dataset, cfg, period

    def after_step(self, state):
        if state.iteration % self.period or state.iteration == state.max_iters:
            return
        evaluation = evaluate(state.model, self.dataset, self.cfg, state.device)
        metrics = evaluation.metrics
        if state.rank == 0:
            write_coco_results(evaluation.results,
                               Path(state.run_dir) / "inference" / f"val_iter{state.iteration:07d}" / RESULTS_FILE)
            record_evaluation(state.run_dir, state.iteration, "val", metrics, evaluation.per_category)
        state.writer.write({"iteration": state.iteration, **{f"val/{k}": v for k, v in metrics.items()}})
        state.metrics.update({f"val/{k}": v for k, v in metrics.items()})


def record_evaluation(run_dir: Path, iteration: int, split: str, metrics: dict,
                      per_category: list[dict] | None = None) -> None:
    """One line per evaluation: the AP-against-iterations curve the reports plot."""
    record = {"iteration": iteration, "split": split, **metrics}
    if per_category is not None:
        record["per_category"] = per_category
    with open(Path(run_dir) / "evals.jsonl", "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def evaluate_checkpoint(checkpoint, data: str, images: str = "", kind: str = "", device: str = "auto",
                        batch_size: int = 2, visualize_n: int = 0, out_dir: str | Path | None = None,
                        num_workers: int = 2, progress: bool = True) -> Evaluation:
    """``predet eval``: a fine-tuned checkpoint on a COCO/LVIS json. Writes ``eval_results.json``
    (metrics and per-category AP) and ``coco_instances_results.json`` into ``out_dir``. Under
    torchrun every rank runs its share of the images and rank 0 scores and writes them."""
    if batch_size <= 0 or num_workers < 0:
        raise ConfigError(f"--batch-size {batch_size}, --num-workers {num_workers}: the batch size must be "
                          "positive and the workers >= 0")
    out = Path(out_dir) if out_dir else Path(checkpoint).parent
    check_writable(out, "--out")  # before the whole inference runs, not after
    with launched(device, "--device") as where:
        detector, cfg, extra = load_detector(checkpoint)
        dataset = build_detection_dataset(data, images or cfg.data.val_images, kind or cfg.data.kind,
                                          masks=cfg.model.arch == "mask_rcnn")
        if list(dataset.cat_ids) != list(extra["cat_ids"]):
            raise AnnotationError(f"{data}: categories {list(dataset.cat_ids)} differ from the checkpoint's "
                                  f"{extra['cat_ids']}; evaluate on data with the training categories")
        detector.to(where.device)
        evaluation = evaluate_dataset_full(detector, dataset, where.device, batch_size, num_workers,
                                           progress=progress)
        if where.is_main:
            with fresh_output(out):
                out.mkdir(parents=True, exist_ok=True)
                write_results_json({"checkpoint": str(checkpoint), "data": str(data), **evaluation.metrics,
                                    "per_category": evaluation.per_category}, out / "eval_results.json")
                write_coco_results(evaluation.results, out / RESULTS_FILE)
                if visualize_n:
                    visualize(detector, dataset, visualize_n, out / "visualize", where.device)
        barrier()
    return evaluation
