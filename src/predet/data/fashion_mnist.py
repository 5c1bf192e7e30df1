"""Fashion-MNIST from local IDX files, the Debian package, or (when online) torchvision.

The FashionDet benchmark must build offline, so the loader reads the IDX format itself and only
falls back to a download when nothing is installed. Where it looks is held in module attributes
(``DEFAULT_SEARCH_PATHS``, ``DOWNLOAD_ENABLED``) so tests can switch the system paths and the
network off.
"""

from __future__ import annotations

import gzip
import os
import warnings
from pathlib import Path

import numpy as np

CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

ENV_VAR = "PREDET_FASHION_MNIST"
DEBIAN_ROOT = Path("/usr/share/datasets/fashion-mnist")
# System-wide places searched after the ``root`` argument and the environment variable.
DEFAULT_SEARCH_PATHS: list[Path] = [DEBIAN_ROOT]
# Last resort: torchvision's downloader into CACHE_DIR. Tests set this to False.
DOWNLOAD_ENABLED = True
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "predet" / "fashion-mnist"

FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
ALL_FILES = FILES["train"] + FILES["test"]

INSTALL_HINT = (
    "Get Fashion-MNIST in one of these ways:\n"
    "  * sudo apt-get install dataset-fashion-mnist   (installs /usr/share/datasets/fashion-mnist)\n"
    f"  * pass --fashion-mnist DIR (or set {ENV_VAR}=DIR), where DIR holds the four IDX files\n"
    "    " + ", ".join(f"{name}.gz" for name in ALL_FILES) + "\n"
    "    (gzipped or not), e.g. from https://github.com/zalandoresearch/fashion-mnist"
)


class FashionMNISTNotFound(FileNotFoundError):
    """No Fashion-MNIST files anywhere we looked; the message says how to get them."""


def read_idx(path: str | Path, ndim: int) -> np.ndarray:
    """Read an unsigned-byte IDX file (gzipped or plain), checking its header against the data.

    A truncated download or a swapped images/labels file must fail loudly, not yield garbage.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 + 4 * ndim:
        raise ValueError(f"{path}: too short for an IDX header")
    if raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] != ndim:
        raise ValueError(
            f"{path}: bad IDX magic {raw[:4].hex()} (expected 000008{ndim:02x}: unsigned bytes, {ndim}-d)"
        )
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    expected = int(np.prod(shape))
    if len(raw) - offset != expected:
        raise ValueError(f"{path}: header says {shape} ({expected} bytes), file has {len(raw) - offset}")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(shape).copy()


def _idx_file(folder: Path, name: str) -> Path | None:
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
    return None


def _complete_folder(folder: Path) -> Path | None:
    """The folder (or torchvision's ``FashionMNIST/raw`` under it) holding all four files."""
    for sub in (folder, folder / "FashionMNIST" / "raw"):
        if all(_idx_file(sub, name) for name in ALL_FILES):
            return sub
    return None


def _download(cache_dir: Path) -> Path | None:
    try:
        from torchvision.datasets import FashionMNIST

        for train in (True, False):
            FashionMNIST(str(cache_dir), train=train, download=True)
    except Exception as err:  # offline, blocked, or torchvision missing: report, don't crash
        warnings.warn(f"Fashion-MNIST download failed: {err}", stacklevel=3)
        return None
    return _complete_folder(cache_dir)


def find_fashion_mnist(root: str | Path | None = None, download: bool | None = None) -> Path:
    """Folder holding the four IDX files: ``root``, then $PREDET_FASHION_MNIST, then the
    default search paths, then a torchvision download into the cache. Raises FashionMNISTNotFound."""
    explicit = [Path(p).expanduser() for p in (root, os.environ.get(ENV_VAR)) if p]
    looked = []
    for folder in [*explicit, *DEFAULT_SEARCH_PATHS, CACHE_DIR]:
        found = _complete_folder(Path(folder))
        if found is not None:
            return found
        looked.append(str(folder))
        if folder in explicit:
            warnings.warn(f"no Fashion-MNIST IDX files in {folder}; trying other places", stacklevel=2)
    tried_download = DOWNLOAD_ENABLED if download is None else download
    if tried_download:
        found = _download(CACHE_DIR)
        if found is not None:
            return found
    raise FashionMNISTNotFound(
        "Fashion-MNIST not found. Looked in: "
        + ", ".join(looked)
        + ("; the torchvision download failed" if tried_download else "; download disabled")
        + ".\n"
        + INSTALL_HINT
    )


def load_fashion_mnist(
    split: str, root: str | Path | None = None, download: bool | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Images (uint8 [N, 28, 28]) and labels (int64 [N]) of the ``"train"`` or ``"test"`` split."""
    if split not in FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = find_fashion_mnist(root, download)
    image_name, label_name = FILES[split]
    images = read_idx(_idx_file(folder, image_name), ndim=3)
    labels = read_idx(_idx_file(folder, label_name), ndim=1).astype(np.int64)
    if images.shape[0] != labels.shape[0] or images.shape[1:] != (28, 28):
        raise ValueError(f"{folder}: {split} images {images.shape} do not match labels {labels.shape}")
    if labels.max(initial=0) >= len(CLASSES):
        raise ValueError(f"{folder}: {split} labels outside 0..{len(CLASSES) - 1}")
    return images, labels
