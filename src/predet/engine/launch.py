"""The launch step: the process group and this process's device, set up once when a command starts.

Everything that depends on the number of processes (a named schedule's iterations and lr, a
shard split, who writes a file, which slice of an evaluation set a rank runs) must see the
real rank and world size. So every verb first goes through :func:`launched`, before anything
reads them, as torchvision's references call ``init_distributed_mode`` first in ``main`` and
Detectron2 its ``launch``. The launch itself is torchrun's: this only reads its environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``); without it,
nothing is initialised and the single-process default needs no special case.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from predet.config import ConfigError
from predet.engine.distributed import cleanup, init_distributed


@dataclass(frozen=True)
class Launch:
    """Where this process stands: its rank among ``world_size`` and the device it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, what: str = "train.device") -> torch.device:
    """"auto" -> CUDA when available, else CPU; asking for CUDA without one is an error
    (``what`` names the setting in the message)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{what}={name!r} is not a device: use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{what}={name!r} but CUDA is not available on this machine: "
                          f"use {what}=cpu (or auto)")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"{what}={name!r}: predet runs on cpu or cuda")
    return device


def launch(device: str = "auto", what: str = "train.device") -> Launch:
    """Join torchrun's process group (the first call creates it: NCCL for CUDA, gloo for the
    CPU) and pick this process's device: under torchrun, GPU ``LOCAL_RANK`` of its node.
    Later calls report the same group, so the steps of one process agree."""
    dev = resolve_device(device, what)
    rank, world_size, local_rank = init_distributed(dev.type)
    if dev.type == "cuda":
        index = local_rank if world_size > 1 else dev.index
        dev = torch.device("cuda", torch.cuda.current_device() if index is None else index)
        torch.cuda.set_device(dev)
    return Launch(rank, world_size, local_rank, dev)


@contextlib.contextmanager
def launched(device: str = "auto", what: str = "train.device"):
    """:func:`launch` for the block; a process group this block created is destroyed after it,
    one that existed before is left to its owner (a test, or an outer command)."""
    created = not (dist.is_available() and dist.is_initialized()) and _env_world_size() > 1
    info = launch(device, what)
    try:
        yield info
    finally:
        if created:
            cleanup()


def _env_world_size() -> int:
    value = os.environ.get("WORLD_SIZE", "").strip()
    return int(value) if value else 1
