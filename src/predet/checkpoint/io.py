"""Checkpoints that survive crashes and never execute code when loaded.

Saves are atomic (temp file in the same directory, fsync, ``os.replace``) so a crash or a full
disk mid-write leaves the previous checkpoint intact. Loads use ``torch.load(weights_only=True)``
only: a checkpoint is data, and a file that carries pickled code is refused. Everything we save
(RNG states included) is therefore kept to tensors and plain Python containers.
"""

from __future__ import annotations

import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from predet.checkpoint.atomic import atomic_write
from predet.engine.distributed import is_main_process, unwrap_model
from predet.errors import CheckpointError, InputNotFound

LAST_CHECKPOINT_FILE = "last_checkpoint"
CHECKPOINT_GLOB = "checkpoint_*.pth"


class RefusedCheckpoint(CheckpointError, pickle.UnpicklingError):
    """A checkpoint that holds pickled objects other than tensors and plain containers."""


def save_checkpoint(path: str | Path, state: dict) -> Path | None:
    """Atomically ``torch.save`` ``state`` to ``path`` on the main process; None elsewhere."""
    if not is_main_process():
        return None
    return atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict:
    """Load a checkpoint with ``weights_only=True``.

    A missing file raises :class:`InputNotFound`, a truncated or damaged one
    :class:`CheckpointError`, one carrying code :class:`RefusedCheckpoint` (also an
    ``UnpicklingError``); all three are one-line user errors.
    """
    if not Path(path).is_file():
        raise InputNotFound(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise RefusedCheckpoint(
            f"refusing to load {path}: it holds objects other than tensors and plain containers "
            f"({_refused_global(str(exc))}); nothing in it was executed (read with weights_only=True). "
            "Re-save it as a plain dict of tensors; torch.load(weights_only=False) would run its code, "
            "so use that only for a file from a source you trust"
        ) from None
    except Exception as exc:  # noqa: BLE001 - torch and safetensors raise many types for one meaning
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"cannot read checkpoint {path}: truncated or damaged ({first[:160]})"
                              ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a predet checkpoint (holds a {type(obj).__name__})")
    return obj


def _refused_global(message: str) -> str:
    """torch's reason, whole: the sentence naming the global it refused (or its first line)."""
    for line in message.splitlines():
        if "WeightsUnpickler error:" in line:
            reason = line.split("WeightsUnpickler error:", 1)[1].strip()
            return reason.split(". ")[0].rstrip(".")
    return (message.strip().splitlines() or ["not a weights-only file"])[0].rstrip(".")


def write_last_checkpoint(checkpoint_path: str | Path) -> None:
    """Record ``checkpoint_path``'s name in ``last_checkpoint`` beside it (main process only)."""
    if not is_main_process():
        return
    checkpoint_path = Path(checkpoint_path)
    atomic_write(checkpoint_path.parent / LAST_CHECKPOINT_FILE,
                 lambda f: f.write(checkpoint_path.name + "\n"), mode="w")


def _iteration_of(path: Path) -> int:
    try:
        return int(path.stem.rsplit("_", 1)[1])
    except (IndexError, ValueError):
        return -1


def checkpoint_candidates(run_dir: str | Path) -> list[Path]:
    """Checkpoints to resume from, best first: the one ``last_checkpoint`` names (if it
    exists), then every ``checkpoint_*.pth`` newest first. Whether each loads is the
    caller's to try: a damaged newest file must not hide an older good one."""
    run_dir = Path(run_dir)
    out: list[Path] = []
    for directory in (run_dir / "checkpoints", run_dir):
        marker = directory / LAST_CHECKPOINT_FILE
        if marker.is_file():
            name = marker.read_text(errors="replace").strip()
            if name and (directory / name).is_file():
                out.append(directory / name)
        found = sorted(directory.glob(CHECKPOINT_GLOB), key=_iteration_of, reverse=True) \
            if directory.is_dir() else []
        out += [p for p in found if p not in out]
    return out


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint file of ``run_dir`` (``last_checkpoint``'s, else the highest
    iteration present); None when the folder holds none. Does not check that it loads."""
    candidates = checkpoint_candidates(run_dir)
    return candidates[0] if candidates else None


def prune_checkpoints(directory: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` ``checkpoint_*.pth`` (main process; ``keep`` 0 keeps
    all). A multi-day run at a checkpoint every few thousand iterations otherwise fills its disk."""
    directory = Path(directory)
    if keep <= 0 or not is_main_process() or not directory.is_dir():
        return []
    found = sorted(directory.glob(CHECKPOINT_GLOB), key=_iteration_of, reverse=True)
    for path in found[keep:]:
        path.unlink(missing_ok=True)
    return found[keep:]


def remove_stale_temp_files(directory: str | Path) -> list[Path]:
    """Delete the ``.<name>.*.tmp`` files a crash left mid-write (main process only)."""
    directory = Path(directory)
    if not is_main_process() or not directory.is_dir():
        return []
    stale = sorted(directory.glob(".*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def capture_rng_state() -> dict:
    """Python, NumPy, torch CPU (and current CUDA device) RNG states as weights_only-safe data."""
    version, internal, gauss = random.getstate()
    algo, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {
        "python": [version, list(internal), gauss],
        "numpy": {"algo": str(algo), "keys": [int(k) for k in keys], "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    # Only the current device: touching every GPU would create a context on each from each rank.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of :func:`capture_rng_state`; absent parts (CUDA on a CPU run) are left alone."""
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        s = state["numpy"]
        np.random.set_state((s["algo"], np.asarray(s["keys"], dtype=np.uint32), s["pos"],
                             s["has_gauss"], s["cached_gaussian"]))
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


def save_safetensors_weights(model: torch.nn.Module, path: str | Path,
                             metadata: dict[str, str] | None = None) -> Path | None:
    """Plain weights (no optimizer, no pickle) in safetensors format, on the main process.

    Tensors are cloned to CPU so tied weights do not trip safetensors' shared-storage check.
    """
    if not is_main_process():
        return None
    from safetensors.torch import save

    state = unwrap_model(model).state_dict()
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    data = save(tensors, metadata=metadata)
    return atomic_write(path, lambda f: f.write(data))
