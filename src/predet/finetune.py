"""``predet finetune`` and ``predet eval``: detectors on box-annotated data (method.md §3).

Settings resolve in this order: the YAML file, then the named preset (a row of the
supplement's tables), then ``key=value`` overrides. A named schedule is given at batch 16
(Detectron2's convention): iterations, milestones, warm-up and lr scale linearly with the
real batch size, and ``schedule_scale`` shrinks them for CPU-sized runs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from predet.checkpoint.transfer import init_layout, load_init_weights
from predet.config import (
    SCRATCH_INITS,
    ConfigError,
    SolverConfig,
    to_dict,
    validate,
)
from predet.config.finetune import FinetuneConfig, load_finetune_config
from predet.config.schedules import (
    resolve_schedule,
    scale_lr,
)
from predet.data.coco import build_detection_dataset, collate_detection
from predet.data.coco_json import subset_path, write_subset
from predet.data.samplers import (
    DeterministicBatchSampler,
    RepeatFactorBatchSampler,
    repeat_factors,
)
from predet.engine.distributed import barrier, get_rank, get_world_size, is_main_process
from predet.engine.launch import launched
from predet.engine.optim import check_solver, param_groups
from predet.engine.preemption import ignore_stop_signals
from predet.engine.runfolder import check_writable, run_folder
from predet.engine.runlog import run_log
from predet.engine.trainer import TrainResult, check_train_config, train
from predet.evaluation.coco import RESULTS_FILE, write_coco_results, write_results_json
from predet.evaluation.evaluate import PeriodicEvaluation, evaluate, record_evaluation
from predet.evaluation.visualize import visualize
from predet.modeling.detectors import build_detector

logger = logging.getLogger(__name__)

MASK_HEAD_MODULES = ("roi_heads.mask_head", "roi_heads.mask_predictor")

__all__ = ["FinetuneConfig", "FinetuneResult", "build_train_loader", "build_training_set", "check_finetune_config", "finetune", "load_finetune_config", "mask_head_groups", "match_init_layout", "resolve_solver", "resolved_config", "scratch_settings", "training_annotations"]


def resolve_solver(cfg: FinetuneConfig, world_size: int | None = None) -> SolverConfig:
    """The solver actually run: a named schedule and its lr scaled to the real batch size,
    ``train.batch_size`` x the processes (by default those of the launched process group).

    A named schedule sets the iterations and milestones, so giving them as well is an error
    rather than silently ignored."""
    world_size = get_world_size() if world_size is None else world_size
    if not cfg.schedule:
        return cfg.solver
    full = resolve_schedule(cfg.schedule)  # an unknown name is the first thing to say
    given = [k for k in ("max_iters", "milestones") if getattr(cfg.solver, k) != getattr(SolverConfig(), k)]
    if given:
        raise ConfigError(f"schedule={cfg.schedule} sets the iterations and milestones, but solver."
                          f"{' and solver.'.join(given)} is given too: set schedule= (empty) to use yours, "
                          "or schedule_scale to shorten the named one")
    batch = cfg.train.batch_size * world_size
    sched = resolve_schedule(cfg.schedule, batch_size=batch, schedule_scale=cfg.schedule_scale)
    factor = sched.max_iters / full.max_iters
    warmup = max(1, round(cfg.solver.warmup_iters * factor)) if cfg.solver.warmup_iters else 0
    return dataclasses.replace(
        cfg.solver, lr=scale_lr(cfg.solver.lr, batch), max_iters=sched.max_iters,
        milestones=list(sched.milestones), warmup_iters=min(warmup, sched.max_iters - 1), schedule="step",
    )


def mask_head_groups(detector, lr_mf: float) -> dict[str, float]:
    """lr multipliers by module name: only Mask R-CNN has a mask head."""
    names = {n for n, _ in detector.named_modules()}
    return {m: lr_mf for m in MASK_HEAD_MODULES if m in names}


def training_annotations(cfg: FinetuneConfig, run_dir: Path) -> str:
    """The training json, or the deterministic N-image subset of it written into the run by
    rank 0 (anew at every start, so a changed ``data.train`` is never met by a stale subset);
    the other ranks wait for it."""
    if not cfg.data.subset:
        return cfg.data.train
    out = subset_path(cfg.data.train, cfg.data.subset, cfg.data.subset_seed, run_dir / "data")
    if is_main_process():
        write_subset(cfg.data.train, cfg.data.subset, cfg.data.subset_seed, out)
    barrier()
    return str(out)


def build_train_loader(dataset, cfg: FinetuneConfig, start_iter: int):
    """Batch ``i`` depends only on (seed, i): resume is exact."""
    rank, world = get_rank(), get_world_size()
    if cfg.data.repeat_factor_threshold > 0:
        factors = repeat_factors(dataset, cfg.data.repeat_factor_threshold)
        sampler = RepeatFactorBatchSampler(factors, cfg.train.batch_size, cfg.train.seed, start_iter, rank, world)
    else:
        sampler = DeterministicBatchSampler(len(dataset), cfg.train.batch_size, cfg.train.seed, start_iter, rank, world)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.train.num_workers, collate_fn=collate_detection,
                      pin_memory=torch.cuda.is_available() and cfg.train.device != "cpu",
                      worker_init_fn=ignore_stop_signals)


@dataclass
class FinetuneResult:
    train: TrainResult
    results: dict
    results_path: Path


def scratch_settings(cfg: FinetuneConfig) -> tuple[FinetuneConfig, list[str]]:
    """From scratch, frozen BN would freeze random statistics and ``freeze_at`` random layers:
    GroupNorm (any batch size, any number of processes) and nothing frozen instead, as
    from-scratch detectors are trained. Returns the config and what was changed, to say so."""
    if cfg.init not in SCRATCH_INITS:
        return cfg, []
    model, notes = cfg.model, []
    if model.norm == "frozen_bn":
        model = dataclasses.replace(model, norm="gn")
        notes.append("model.norm=frozen_bn would freeze random BN statistics: using model.norm=gn "
                     "(or set model.norm=syncbn / bn yourself)")
    if model.freeze_at > 0:
        notes.append(f"model.freeze_at={model.freeze_at} would freeze randomly initialised layers: using 0")
        model = dataclasses.replace(model, freeze_at=0)
    return dataclasses.replace(cfg, model=model), notes


def check_finetune_config(cfg: FinetuneConfig) -> None:
    """Everything that can be refused before data is read or a file is written."""
    validate(cfg)  # also a config built in code, not loaded from YAML
    if not cfg.data.train:
        raise ConfigError("data.train is empty: give a COCO or LVIS json")
    check_writable(cfg.train.run_dir, "train.run_dir")
    if cfg.init not in SCRATCH_INITS and not Path(cfg.init).is_file():
        raise ConfigError(f"init={cfg.init!r}: file not found; use 'scratch', 'random' or the path "
                          "of a weight file")
    check_train_config(cfg.train)
    try:
        check_solver(resolve_solver(cfg))
    except ConfigError:
        raise
    except ValueError as exc:  # an unknown schedule name, a bad schedule_scale
        raise ConfigError(f"schedule={cfg.schedule!r}: {exc}") from None


def finetune(cfg: FinetuneConfig) -> FinetuneResult:
    """Fine-tune a detector from ``cfg.init`` and evaluate it; results.json and log.txt land in
    the run dir, which the run holds (a lock) while it trains. Under torchrun the process group
    is joined first, so the schedule resolves at the real total batch."""
    with launched(cfg.train.device):
        check_finetune_config(cfg)
        run_dir = Path(cfg.train.run_dir)
        with run_folder(run_dir, "fine-tuning"), run_log(run_dir):
            cfg, notes = scratch_settings(cfg)
            for note in notes:
                logger.warning("init=%s: %s", cfg.init, note)
            return _finetune(cfg, run_dir)


def match_init_layout(cfg: FinetuneConfig) -> FinetuneConfig:
    """Build the ResNet the way the init weights were trained: Detectron2/MSRA weights
    downsample in the 1x1 conv (``model.stride_in_1x1``), torchvision ones in the 3x3."""
    layout = init_layout(cfg.init, cfg.init_stride_in_1x1, cfg.init_input_format)
    if layout.stride_in_1x1 is None or layout.stride_in_1x1 == cfg.model.stride_in_1x1:
        return cfg
    logger.info("%s: %s downsample in the %s conv: model.stride_in_1x1=%s", cfg.init, layout.why,
                "1x1" if layout.stride_in_1x1 else "3x3", str(layout.stride_in_1x1).lower())
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, stride_in_1x1=layout.stride_in_1x1))


def resolved_config(cfg: FinetuneConfig) -> FinetuneConfig:
    """The config a run actually trains with (what ``--print-config`` shows)."""
    return match_init_layout(scratch_settings(cfg)[0])


def build_training_set(cfg: FinetuneConfig, run_dir: Path):
    """The training split (or its ``data.subset``) with the training augmentation."""
    return build_detection_dataset(training_annotations(cfg, run_dir), cfg.data.train_images, cfg.data.kind,
                                   train=True, masks=cfg.model.arch == "mask_rcnn", flip_p=cfg.data.flip_p)


def _finetune(cfg: FinetuneConfig, run_dir: Path) -> FinetuneResult:
    cfg = match_init_layout(cfg)
    train_cfg = dataclasses.replace(cfg.train, sync_bn=cfg.train.sync_bn or cfg.model.norm == "syncbn")
    masks = cfg.model.arch == "mask_rcnn"
    train_set = build_training_set(cfg, run_dir)
    val_set = None
    if cfg.data.val:
        val_set = build_detection_dataset(cfg.data.val, cfg.data.val_images, cfg.data.kind, masks=masks)
    test_set = _test_set(cfg, masks)  # read and checked now: a bad test file must not wait for the end
    logger.info("training data: %s", train_set.stats_summary())

    torch.manual_seed(cfg.train.seed)
    detector = build_detector(cfg.model, num_classes=len(train_set.cat_ids))
    report = load_init_weights(detector, cfg.init, cfg.model.arch, cfg.init_stride_in_1x1, cfg.init_input_format)
    if is_main_process():
        (run_dir / "init_report.json").write_text(json.dumps(report.to_dict(), indent=1, default=str))

    solver = resolve_solver(cfg)
    groups = mask_head_groups(detector, cfg.optim.lr_mf)
    hooks = [PeriodicEvaluation(val_set, cfg, cfg.train.eval_period)] if val_set and cfg.train.eval_period else []
    result = train(
        detector, lambda start: iter(build_train_loader(train_set, cfg, start)), solver, train_cfg,
        extra_state={"kind": "predet_finetune", "cat_ids": list(train_set.cat_ids),
                     "category_names": list(train_set.category_names)},
        param_groups=partial(param_groups, lr_mults=groups) if groups else None,
        hooks=hooks, config_dict=to_dict(cfg),
    )
    results_path = run_dir / "results.json"
    done = json.loads(results_path.read_text()) if results_path.exists() else {}
    if done.get("iteration") == result.iteration:  # a resumed run that had already finished
        return FinetuneResult(result, done, results_path)
    results = {"iteration": result.iteration, "init": cfg.init, "schedule": cfg.schedule,
               "solver": to_dict(solver), "processes": get_world_size(), "train_data": train_set.stats,
               "skipped_images": {"count": result.skipped,
                                  "list": str(run_dir / "skipped.jsonl") if result.skipped else None}}
    device = next(detector.parameters()).device
    for split, dataset in (("val", val_set), ("test", test_set)):
        if dataset is None:
            continue
        evaluation = evaluate(detector, dataset, cfg, device, progress=cfg.train.progress)
        results[split] = evaluation.metrics
        results.setdefault("per_category", {})[split] = evaluation.per_category
        if is_main_process():
            write_coco_results(evaluation.results, run_dir / "inference" / split / RESULTS_FILE)
            record_evaluation(run_dir, result.iteration, split, evaluation.metrics, evaluation.per_category)
    if is_main_process():
        if cfg.eval.visualize and val_set is not None:
            visualize(detector, val_set, cfg.eval.visualize, run_dir / "visualize", device)
        write_results_json(results, results_path)
    barrier()  # results.json is on disk before any rank reports the run finished
    return FinetuneResult(result, results, results_path)


def _test_set(cfg: FinetuneConfig, masks: bool):
    if not cfg.data.test:
        return None
    return build_detection_dataset(cfg.data.test, cfg.data.test_images, cfg.data.kind, masks=masks)
