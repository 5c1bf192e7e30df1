"""``predet pretrain``: PreDet pre-training on weakly labelled images (method.md §2)."""

from __future__ import annotations

import dataclasses
import functools

import torch
from torch.utils.data import DataLoader

from predet.checkpoint.io import load_checkpoint
from predet.config import (
    ConfigError,
    SolverConfig,
    from_dict,
    to_dict,
    validate,
)
from predet.config.pretrain import PretrainConfig, load_pretrain_config
from predet.config.schedules import scale_solver
from predet.data.build import build_weak_dataset, heldout_dataset
from predet.data.samplers import DeterministicBatchSampler
from predet.data.views import (
    TwoViewTransform,
    WholeImageTransform,
    collate_images,
    collate_two_view,
    decorrelated_colours,
)
from predet.data.weak import Vocabulary
from predet.engine.distributed import get_rank, get_world_size
from predet.engine.launch import launched, resolve_device
from predet.engine.optim import check_solver
from predet.engine.preemption import ignore_stop_signals
from predet.engine.runfolder import check_writable, run_folder
from predet.engine.runlog import run_log
from predet.engine.trainer import TrainResult, check_train_config, train
from predet.evaluation.pretext import PretextDiagnosticsHook
from predet.evaluation.probe import TransferProbeHook, check_probe_config
from predet.modeling.predet.meta_arch import PreDet, crpn_target_sampler

__all__ = ["PretrainConfig", "build_pretrain_loader", "build_pretrain_model", "check_pretrain_config", "load_pretrain_config", "pretrain", "read_vocab", "resolve_solver", "weight_change"]


def read_vocab(path: str) -> Vocabulary | None:
    return Vocabulary.load_json(path) if path else None


def check_pretrain_config(cfg: PretrainConfig) -> None:
    """Everything that can be refused before data is read or a file is written."""
    validate(cfg)  # also a config built in code, not loaded from YAML
    if not cfg.data.train:
        raise ConfigError("data.train is empty: give a labels.jsonl, a shard pattern or a shard folder")
    check_writable(cfg.train.run_dir, "train.run_dir")
    if not any((cfg.loss.lambda_cls, cfg.loss.lambda_rpn, cfg.loss.lambda_roi)):
        raise ConfigError("all of loss.lambda_cls, loss.lambda_rpn, loss.lambda_roi are 0: nothing to train")
    check_solver(resolve_solver(cfg))
    check_train_config(cfg.train)
    if cfg.probe.data:
        check_probe_config(cfg.probe)


def resolve_solver(cfg: PretrainConfig, world_size: int | None = None) -> SolverConfig:
    """The solver run at the real total batch (``train.batch_size`` x the processes of the
    launched group): ``cfg.solver`` as given, or scaled from ``reference_batch``."""
    world_size = get_world_size() if world_size is None else world_size
    return scale_solver(cfg.solver, cfg.reference_batch, cfg.train.batch_size * world_size)


def build_pretrain_loader(dataset, cfg: PretrainConfig, start_iter: int, rank: int, world: int):
    """A loader that resumes exactly: batch ``i`` depends only on (seed, i)."""
    on_gpu = resolve_device(cfg.train.device).type == "cuda"
    pin = on_gpu  # pinned pages: async copies to the GPU
    # a CPU run hides colour jitter and the CRPN's anchor sample in its loader workers; a GPU
    # run does both on the device, where they cost next to nothing and the loader's cores are scarce
    sampler = crpn_target_sampler(cfg.model, cfg.data.views.size) if cfg.loss.lambda_rpn > 0 and not on_gpu else None
    collate = functools.partial(collate_two_view, colour_in_loader=not on_gpu, crpn_sampler=sampler)
    if isinstance(dataset, torch.utils.data.IterableDataset):
        if hasattr(dataset, "resumed_at"):
            dataset = dataset.resumed_at(start_iter, cfg.train.batch_size)
        return DataLoader(
            dataset, batch_size=cfg.train.batch_size, num_workers=cfg.train.num_workers,
            collate_fn=collate, persistent_workers=False, pin_memory=pin, worker_init_fn=ignore_stop_signals,
        )
    sampler = DeterministicBatchSampler(
        len(dataset), cfg.train.batch_size, cfg.train.seed, start_iter=start_iter, rank=rank, world_size=world
    )
    return DataLoader(
        dataset, batch_sampler=sampler, num_workers=cfg.train.num_workers, collate_fn=collate,
        persistent_workers=False, prefetch_factor=4 if cfg.train.num_workers else None, pin_memory=pin,
        worker_init_fn=ignore_stop_signals,
    )


def build_pretrain_model(cfg: PretrainConfig, num_classes: int) -> PreDet:
    """The model a run starts from: seeded, so the same config always gives the same init."""
    torch.manual_seed(cfg.train.seed)
    return PreDet(num_classes, cfg.model, cfg.loss)


def pretrain(cfg: PretrainConfig) -> TrainResult:
    """Pre-train a PreDet model; returns where the run ended and its checkpoint. The run holds
    its folder (a lock) and logs to ``log.txt`` in it. Under torchrun the process group is
    joined first, so the solver, the shard split and who writes what see the real world size."""
    with launched(cfg.train.device):
        check_pretrain_config(cfg)
        with run_folder(cfg.train.run_dir, "pre-training"), run_log(cfg.train.run_dir):
            return _pretrain(cfg)


def _pretrain(cfg: PretrainConfig) -> TrainResult:
    transform = TwoViewTransform(cfg.data.views)
    vocab = read_vocab(cfg.data.vocab)
    dataset, vocab = build_weak_dataset(cfg.data.train, vocab, transform, cfg.train.seed, repeat=True)
    train_cfg = cfg.train
    if 0 in (cfg.loss.lambda_cls, cfg.loss.lambda_rpn, cfg.loss.lambda_roi):
        train_cfg = dataclasses.replace(train_cfg, find_unused_parameters=True)
    if cfg.model.norm == "syncbn":
        train_cfg = dataclasses.replace(train_cfg, sync_bn=True)
    model = build_pretrain_model(cfg, len(vocab))

    hooks = []
    if cfg.data.val and cfg.train.eval_period > 0:
        d = cfg.data
        pairs = heldout_dataset(d.val, vocab, TwoViewTransform(decorrelated_colours(d.views)), d.val_pairs)
        images = heldout_dataset(d.val, vocab, WholeImageTransform(d.views.size), d.val_max_images)
        hooks.append(PretextDiagnosticsHook(pairs, collate_two_view, cfg.train.eval_period, num_pairs=d.val_pairs,
                                            images=images, collate_images=collate_images,
                                            num_workers=min(cfg.train.num_workers, 2)))

    if cfg.probe.data:
        hooks.append(TransferProbeHook(cfg.probe))

    if hasattr(dataset, "check_split"):
        dataset.check_split(get_world_size(), cfg.train.num_workers)

    def make_loader(start_iter: int):
        return iter(build_pretrain_loader(dataset, cfg, start_iter, get_rank(), get_world_size()))

    return train(
        model, make_loader, resolve_solver(cfg), train_cfg,
        extra_state={"vocab": vocab.to_list(), "kind": "predet_pretrain"},
        hooks=hooks, config_dict=to_dict(cfg),
    )


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
