"""The shared training engine: distributed setup, checkpoints, optimiser, metrics, loop."""

from .checkpoint import (
    capture_rng_state,
    latest_checkpoint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    save_safetensors_weights,
)
from .distributed import (
    all_reduce_mean,
    barrier,
    cleanup,
    get_rank,
    get_world_size,
    init_distributed,
    is_main_process,
    move_to_device,
    unwrap_model,
)
from .metrics import MetricsWriter, SmoothedValue, format_eta, read_metrics
from .optim import build_lr_scheduler, build_optimizer, lr_at, lr_factor, param_groups
from .trainer import (
    ResumeError,
    TrainerState,
    TrainResult,
    config_differences,
    seed_everything,
    train,
)

__all__ = [
    "MetricsWriter",
    "ResumeError",
    "SmoothedValue",
    "TrainResult",
    "TrainerState",
    "all_reduce_mean",
    "barrier",
    "build_lr_scheduler",
    "build_optimizer",
    "capture_rng_state",
    "cleanup",
    "config_differences",
    "format_eta",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_main_process",
    "latest_checkpoint",
    "load_checkpoint",
    "lr_at",
    "lr_factor",
    "move_to_device",
    "param_groups",
    "read_metrics",
    "restore_rng_state",
    "save_checkpoint",
    "save_safetensors_weights",
    "seed_everything",
    "train",
    "unwrap_model",
]
