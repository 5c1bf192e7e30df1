"""Weak-label pre-training data: images with noisy image-level tags, no boxes.

Two sources produce the same per-sample dicts:

* a folder of images plus a ``labels.jsonl`` file (small sets, easy to inspect), read by
  :class:`WeakLabelFolder`;
* WebDataset tar shards (scale), read by ``predet.data.shards``, split by DDP rank and
  DataLoader worker.

This module holds what both share (the vocabulary, label records and their checks, how a
sample is made and how a batch carries skipped images) and the folder source;
``predet.data.build`` picks the source a path names.

A sample is ``{"path": str, "labels": float multi-hot [C], **transform(image, sample_seed)}``
(``"image"``: uint8 CHW tensor when there is no transform). Images that cannot be decoded
do not raise and are not silently dropped: they come back as
``{"skipped": True, "path": ..., "reason": ...}`` so :func:`collate_weak` can carry them
inside the batch and the trainer can count them across worker processes.

Augmentation randomness comes from an explicit per-sample seed, never from global RNG
state, so a run is reproducible and a resumed run (see ``predet.data.samplers.DeterministicBatchSampler``)
sees exactly the samples and augmentations it would have seen without the interruption.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms.functional import pil_to_tensor

from predet.data.images import open_rgb
from predet.errors import (
    InputNotFound,
    UserError,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "LabelFileError",
    "Vocabulary",
    "WeakLabelFolder",
    "WeakRecord",
    "collate_weak",
    "read_labels_jsonl",
]

# Sample-key extensions recognised as the image of a shard sample, in order of preference.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "pgm", "tif", "tiff", "gif", "img")

Transform = Callable[[Image.Image, int], dict]


class LabelFileError(UserError):
    """A labels file (or shard sample) whose content does not fit the expected format."""


# --------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------


class Vocabulary:
    """Ordered class names; the index of a name is its column in the multi-hot target.

    Stored in checkpoints as a plain ``list[str]`` (:meth:`to_list`) so they load with
    ``torch.load(weights_only=True)``.
    """

    def __init__(self, names: Iterable[str]):
        names = list(names)
        if not names:
            raise ValueError("a vocabulary needs at least one class name")
        for name in names:
            if not isinstance(name, str) or not name:
                raise ValueError(f"class names must be non-empty strings, got {name!r}")
        self._index = {}
        for i, name in enumerate(names):
            if name in self._index:
                raise ValueError(f"duplicate class name {name!r} in vocabulary")
            self._index[name] = i
        self._names = tuple(names)

    @classmethod
    def from_names(cls, names: Iterable[str]) -> "Vocabulary":
        return cls(names)

    @classmethod
    def build(cls, records: Iterable[Any]) -> "Vocabulary":
        """Sorted unique names over all records (``WeakRecord`` or plain lists of names)."""
        names = set()
        for record in records:
            names.update(record.labels if hasattr(record, "labels") else record)
        if not names:
            raise ValueError("cannot build a vocabulary: no record has any label")
        return cls(sorted(names))

    @classmethod
    def from_list(cls, names: Sequence[str]) -> "Vocabulary":
        return cls(names)

    def to_list(self) -> list[str]:
        return list(self._names)

    @classmethod
    def load_json(cls, path: str | Path) -> "Vocabulary":
        """Read a ``vocab.json`` (a JSON list of names)."""
        if not Path(path).is_file():
            raise InputNotFound(f"vocabulary file not found: {path} (data.vocab: a JSON list of "
                                "class names, or empty to build it from the labels)")
        try:
            names = json.loads(Path(path).read_bytes().decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise LabelFileError(f"{path}: invalid JSON: {exc}") from None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise LabelFileError(f"{path}: expected a JSON list of class names")
        try:
            return cls(names)
        except ValueError as exc:
            raise LabelFileError(f"{path}: {exc}") from None

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_list(), indent=0) + "\n")

    @property
    def names(self) -> tuple[str, ...]:
        return self._names

    def index(self, name: str) -> int:
        try:
            return self._index[name]
        except KeyError:
            raise KeyError(f"unknown label {name!r} (vocabulary has {len(self)} classes)") from None

    def encode(self, names: Iterable[str]) -> torch.Tensor:
        """Multi-hot float vector [C]; repeated names count once."""
        target = torch.zeros(len(self))
        for name in names:
            target[self.index(name)] = 1.0
        return target

    def encode_indices(self, indices: Iterable[int]) -> torch.Tensor:
        target = torch.zeros(len(self))
        for i in indices:
            if not 0 <= i < len(self):
                raise IndexError(f"class index {i} out of range for {len(self)} classes")
            target[i] = 1.0
        return target

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self._names == other._names

    def __repr__(self) -> str:
        head = ", ".join(self._names[:5]) + (", ..." if len(self) > 5 else "")
        return f"Vocabulary({len(self)} classes: {head})"


# --------------------------------------------------------------------------------------
# labels.jsonl
# --------------------------------------------------------------------------------------


@dataclass
class WeakRecord:
    """One line of a labels file: absolute image path, tag names, 1-based line number."""

    image: str
    labels: list[str]
    line: int


def show_value(value: Any, limit: int = 60) -> str:
    text = json.dumps(value) if _is_json_value(value) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_json_value(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def _error(path: str | Path, line: int, message: str, field: str | None = None) -> LabelFileError:
    where = f'{path}:{line}: field "{field}": ' if field else f"{path}:{line}: "
    return LabelFileError(where + message)


def _parse_line(text: str, path: Path, line: int, root: Path) -> WeakRecord:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _error(path, line, f"invalid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise _error(path, line, f"expected a JSON object, got {show_value(obj)}")
    if "image" not in obj:
        raise _error(path, line, "missing", field="image")
    image = obj["image"]
    if not isinstance(image, str) or not image.strip():
        raise _error(path, line, f"expected a non-empty path string, got {show_value(image)}", "image")
    if "labels" not in obj:
        raise _error(path, line, "missing", field="labels")
    labels = obj["labels"]
    if not isinstance(labels, list) or not all(isinstance(n, str) and n for n in labels):
        raise _error(path, line, f"expected a list of strings, got {show_value(labels)}", "labels")
    return WeakRecord(image=os.path.abspath(root / image), labels=list(labels), line=line)


def read_labels_jsonl(path: str | Path, image_root: str | Path | None = None) -> list[WeakRecord]:
    """Parse a labels file; relative image paths resolve against ``image_root`` or its folder.

    Blank lines are allowed. Any malformed line stops with a :class:`LabelFileError` naming
    the file, line and field: a bad line found before training is cheap, one found at
    hour ten is not.
    """
    path = Path(path)
    if not path.is_file():
        raise InputNotFound(f"labels file not found: {path}")
    root = Path(image_root) if image_root is not None else path.parent
    records = []
    with path.open("rb") as f:
        for line, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise _error(path, line, f"not UTF-8 text (byte {exc.start + 1} of the line); "
                             "re-encode the file as UTF-8") from None
            if text.strip():
                records.append(_parse_line(text, path, line, root))
    if not records:
        raise LabelFileError(f"{path}: no records")
    return records


def check_labels(records: Iterable[WeakRecord], vocab: Vocabulary, path: str | Path) -> None:
    """Fail on the first label name that a fixed vocabulary does not know."""
    for record in records:
        for name in record.labels:
            if name not in vocab:
                raise _error(
                    path,
                    record.line,
                    f"unknown label {name!r} (not in the given vocabulary of {len(vocab)} classes)",
                    field="labels",
                )


# --------------------------------------------------------------------------------------
# Image decoding and samples
# --------------------------------------------------------------------------------------


def try_open(source: str | io.BytesIO) -> tuple[Image.Image | None, str]:
    try:
        return open_rgb(source), ""  # data/images.py: the decoder every step shares
    except FileNotFoundError:
        return None, "not found"
    except Exception as exc:  # PIL raises many types for bad data; all mean "unusable"
        return None, f"{type(exc).__name__}: {exc}"


def skipped_sample(path: str, reason: str) -> dict:
    return {"skipped": True, "path": path, "reason": reason}


def make_sample(path: str, labels: torch.Tensor, image: Image.Image, transform, seed: int) -> dict:
    if transform is None:
        return {"path": path, "labels": labels, "image": pil_to_tensor(image)}
    out = transform(image, seed)
    if not isinstance(out, dict):
        raise TypeError(f"weak-data transform must return a dict, got {type(out).__name__}")
    return {"path": path, "labels": labels, **out}


class WeakLabelFolder(Dataset):
    """Images listed in a ``labels.jsonl`` file with their noisy tags.

    ``dataset[i]`` or ``dataset[(i, sample_seed)]`` (the form
    :class:`~predet.data.samplers.DeterministicBatchSampler` yields). With a plain int the seed is ``i``.
    """

    def __init__(
        self,
        labels_file: str | Path,
        vocab: Vocabulary | None = None,
        transform: Transform | None = None,
        image_root: str | Path | None = None,
    ):
        self.labels_file = str(labels_file)
        self.records = read_labels_jsonl(labels_file, image_root)
        if vocab is None:
            vocab = Vocabulary.build(self.records)
        else:
            check_labels(self.records, vocab, labels_file)
        self.vocab = vocab
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        if isinstance(key, (tuple, list)):
            index, seed = int(key[0]), int(key[1])
        else:
            index = seed = int(key)
        record = self.records[index]
        image, reason = try_open(record.image)
        if image is None:
            return skipped_sample(record.image, reason)
        labels = self.vocab.encode(record.labels)
        return make_sample(record.image, labels, image, self.transform, seed)


# --------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------


def collate_weak(samples: Sequence[dict]) -> dict:
    """``{"samples": kept dicts, "labels": [B, C], "skipped": [(path, reason), ...],
    "damaged_shards": [(url, reason, shards in the set), ...]}``.

    Skipped samples travel in the batch so the main process can count them whatever the
    number of DataLoader workers. ``labels`` is ``[0, 0]`` if every sample was skipped.
    Per-sample outputs (images, boxes, views) are left as a list for the model's own
    batching, since their sizes may differ.
    """
    kept = [s for s in samples if not s.get("skipped")]
    skipped = [(s["path"], s["reason"]) for s in samples if s.get("skipped") and not s.get("shards")]
    damaged = [(s["path"], s["reason"], s["shards"]) for s in samples if s.get("skipped") and s.get("shards")]
    labels = torch.stack([s["labels"] for s in kept]) if kept else torch.zeros(0, 0)
    return {"samples": kept, "labels": labels, "skipped": skipped, "damaged_shards": damaged}
