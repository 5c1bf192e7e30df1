"""Process-group helpers that read torchrun's environment and are no-ops in a single process.

The launch is torchrun's (or ``torch.multiprocessing.spawn`` in tests): the code only reads
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. Every helper
works unchanged when no process group exists, so the single-CPU default needs no special case.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

# Long enough for rank 0 to score a COCO or LVIS evaluation while the others wait at the next
# collective (NCCL's own default is 10 minutes); a rank that really died is caught by torchrun.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)
_OBJECT_GROUP = None  # a gloo group for Python objects when the default group is NCCL


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip() else default


def is_distributed() -> bool:
    """True once a process group with more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def get_local_rank() -> int:
    return _env_int("LOCAL_RANK", 0)


def is_main_process() -> bool:
    return get_rank() == 0


def init_distributed(device_type: str | None = None) -> tuple[int, int, int]:
    """Join the process group described by torchrun's env; returns (rank, world_size, local_rank).

    ``device_type`` picks the backend: NCCL for "cuda", gloo otherwise; by default CUDA is used
    when available. Without ``WORLD_SIZE`` > 1 nothing is initialised. Calling it again after the
    group exists just reports the existing group, so pre-training then fine-tuning in one
    process works.
    """
    local_rank = get_local_rank()
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), local_rank
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size <= 1:
        return 0, 1, 0
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but torch.distributed is not available in this build")
    rank = _env_int("RANK", 0)
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cuda":
        # NCCL binds one GPU per process; it must be selected before the group is created.
        torch.cuda.set_device(local_rank)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size,
                            timeout=COLLECTIVE_TIMEOUT)
    if backend == "nccl":
        # Detections and diagnostics are gathered as pickled objects: over gloo they stay in
        # host memory instead of taking a round trip through every GPU (as Detectron2 does).
        global _OBJECT_GROUP
        _OBJECT_GROUP = dist.new_group(backend="gloo", timeout=COLLECTIVE_TIMEOUT)
    return rank, world_size, local_rank


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def _collective_device() -> torch.device:
    """NCCL only reduces CUDA tensors; gloo wants CPU tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_mean(values: dict[str, float]) -> dict[str, float]:
    """Mean of each value over all ranks, in one collective.

    Every rank must pass the same keys (they are sorted, so insertion order may differ).
    """
    if not is_distributed() or not values:
        return {k: float(v) for k, v in values.items()}
    keys = sorted(values)
    packed = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64,
                          device=_collective_device())
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    packed /= dist.get_world_size()
    return dict(zip(keys, packed.cpu().tolist()))


def all_reduce_sum_ints(values: list[int]) -> list[int]:
    """Element-wise sum over ranks of a short list of ints (one collective)."""
    if not is_distributed():
        return [int(v) for v in values]
    t = torch.tensor([int(v) for v in values], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return [int(v) for v in t.cpu().tolist()]


def all_gather_object(obj) -> list:
    """Every rank's ``obj`` in rank order (a one-item list in a single process)."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_to_main(obj) -> list | None:
    """Every rank's ``obj`` in rank order on rank 0 (None elsewhere): detections of a sharded
    evaluation meet where they are scored, and no other rank holds all of them."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size() if get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0, group=_OBJECT_GROUP)
    return out


def broadcast_from_main(obj):
    """Rank 0's ``obj`` on every rank (e.g. the metrics it scored, or a decision it took)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_OBJECT_GROUP)
    return box[0]


def cleanup() -> None:
    """Destroy the process group if one exists; the CLI calls this once at exit."""
    global _OBJECT_GROUP
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _OBJECT_GROUP = None


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The user's module inside DDP / DataParallel / torch.compile wrappers (for state dicts)."""
    while True:
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def move_to_device(obj: Any, device: torch.device | str) -> Any:
    """Tensors inside nested dicts / lists / tuples moved to ``device`` (non-blocking)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return {k: move_to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(move_to_device(v, device) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(move_to_device(v, device) for v in obj)
    return obj
