"""Reading weight files of every kind users bring (torchvision, SEER/InfoMin/MoCo-style prefixed
backbones, safetensors, Detectron2 ``.pth``/``.pkl``, PreDet checkpoints) without executing code:
``.pth`` through ``torch.load(weights_only=True)``, ``.pkl`` through :class:`RestrictedUnpickler`,
which only rebuilds NumPy arrays and dicts; and telling which kind a state dict is."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from predet.checkpoint.io import RefusedCheckpoint, load_checkpoint
from predet.checkpoint.renames import c2_to_detectron2
from predet.errors import CheckpointError

logger = logging.getLogger(__name__)


_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    # protocol-5 pickles of arrays rebuild them from an in-band buffer
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    # Python 3 protocol-2 pickles store array bytes as latin-1 text: encode(str, "latin1") -> bytes
    ("_codecs", "encode"),
}


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """The only ``_codecs.encode`` a weight pickle needs; other codecs are refused."""
    if encoding != "latin1":
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles NumPy arrays, dtypes and scalars, (ordered) dicts and plain containers only.

    A Detectron2 model-zoo ``.pkl`` needs no more; any other global (``os.system``, ``eval``,
    a class with a ``__reduce__`` payload) raises ``pickle.UnpicklingError`` before it is
    imported, so nothing in the file runs.
    """

    def __init__(self, file, path: str | Path = "<pickle>"):
        super().__init__(file, encoding="latin1")  # Python 2 era Caffe2/Detectron files
        self.path = str(path)

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if (module, name) not in _NUMPY_GLOBALS:
            raise RefusedCheckpoint(
                f"refusing to load {self.path}: it references the global {module}.{name}; only NumPy "
                "arrays and dicts are allowed in a weight file (nothing in it was executed)"
            )
        if module == "_codecs":
            return _latin1_encode
        if module.startswith("numpy.core.") and importlib.util.find_spec("numpy._core") is not None:
            module = "numpy._core." + module[len("numpy.core."):]  # NumPy 2 name, no deprecation warning
        return getattr(importlib.import_module(module), name)


def load_pickle_weights(path: str | Path):
    """Load a ``.pkl`` weight file through :class:`RestrictedUnpickler`."""
    with open(path, "rb") as f:
        return RestrictedUnpickler(f, path).load()


def read_weight_file(path: str | Path):
    """The raw object in a weight file, read by a loader that cannot run code."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # noqa: BLE001 - SafetensorError and OSError alike: unusable
            raise CheckpointError(f"cannot read {path}: truncated or damaged safetensors file ({exc})") from None
    if path.suffix in (".pkl", ".pickle") and not zipfile.is_zipfile(path):
        return load_pickle_weights(path)
    return load_checkpoint(path, map_location="cpu")


def _as_tensor(value):
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray) and value.dtype.kind in "fiub":
        return torch.from_numpy(np.array(value, copy=True))
    return None


def flat_state_dict(obj, path) -> tuple[dict[str, torch.Tensor], str | None]:
    """(tensors by name, checkpoint kind) from the usual wrappers: model / state_dict / blobs."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a dict of weights")
    kind = None
    extra = obj.get("extra_state")
    if isinstance(extra, dict):
        kind = extra.get("kind")
    for key in ("model", "state_dict", "blobs"):
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    state = {}
    for name, value in obj.items():
        tensor = _as_tensor(value)
        if isinstance(name, str) and tensor is not None:
            state[name] = tensor
    return state, kind


# Component names that wrap a ResNet/RegNet in self-supervised and DDP releases.
_WRAPPERS = {"module", "encoder", "encoder_q", "base_encoder", "model", "backbone", "trunk"}

_BACKBONE_ROOTS = ("conv1.weight", "stem.0.weight")


def backbone_prefix(keys) -> str | None:
    """The wrapper prefix in front of a classification backbone (``module.encoder_q.``), or None."""
    found = []
    for key in keys:
        for root in _BACKBONE_ROOTS:
            if key.endswith(root):
                prefix = key[: -len(root)]
                if all(part in _WRAPPERS for part in prefix.split(".")[:-1]):
                    found.append(prefix)
    return min(found, key=len) if found else None


def detect_format(state: dict, kind: str | None) -> str:
    keys = list(state)
    if kind == "predet_pretrain" or any(k.startswith("crpn.trunk.") for k in keys):
        return "predet"
    if any(k.startswith(("backbone.bottom_up.", "proposal_generator.")) for k in keys):
        return "detectron2"
    if any(c2_to_detectron2(k) for k in keys) and not any("." in k for k in keys):
        return "caffe2"
    if any(k.startswith("backbone.body.") for k in keys):
        return "torchvision_detector"
    if backbone_prefix(keys) is not None:
        return "backbone"
    return "unknown"


FORMAT_NAMES = {
    "predet": "PreDet pre-training checkpoint",
    "detectron2": "Detectron2 weights",
    "caffe2": "Caffe2/Detectron1 ResNet weights",
    "torchvision_detector": "torchvision detector weights",
    "backbone": "classification backbone",
    "scratch": "no weights (from scratch)",
}
