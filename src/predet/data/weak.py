"""Weak-label pre-training data: images with noisy image-level tags, no boxes.

Two sources produce the same per-sample dicts:

* a folder of images plus a ``labels.jsonl`` file (small sets, easy to inspect), read by
  :class:`WeakLabelFolder`;
* WebDataset tar shards (scale), read by :func:`weak_webdataset`, split by DDP rank and
  DataLoader worker.

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

import copy
import glob
import shutil
import hashlib
import io
import itertools
import json
import os
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import Dataset, IterableDataset
from torchvision.transforms.functional import pil_to_tensor
from webdataset.shardlists import expand_urls
from webdataset.utils import pytorch_worker_info

from predet.data.images import open_rgb
from predet.data.samplers import derive_seed
from predet.errors import InputNotFound, OutputExists, UserError, disk_full, is_disk_full

__all__ = [
    "IMAGE_EXTENSIONS",
    "LabelFileError",
    "Vocabulary",
    "WeakLabelFolder",
    "WeakRecord",
    "WeakShardDataset",
    "build_weak_dataset",
    "collate_weak",
    "expand_shards",
    "heldout_dataset",
    "read_labels_jsonl",
    "weak_webdataset",
    "write_webdataset_shards",
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


def _show(value: Any, limit: int = 60) -> str:
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
        raise _error(path, line, f"expected a JSON object, got {_show(obj)}")
    if "image" not in obj:
        raise _error(path, line, "missing", field="image")
    image = obj["image"]
    if not isinstance(image, str) or not image.strip():
        raise _error(path, line, f"expected a non-empty path string, got {_show(image)}", "image")
    if "labels" not in obj:
        raise _error(path, line, "missing", field="labels")
    labels = obj["labels"]
    if not isinstance(labels, list) or not all(isinstance(n, str) and n for n in labels):
        raise _error(path, line, f"expected a list of strings, got {_show(labels)}", "labels")
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


def _check_labels(records: Iterable[WeakRecord], vocab: Vocabulary, path: str | Path) -> None:
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


def _try_open(source: str | io.BytesIO) -> tuple[Image.Image | None, str]:
    try:
        return open_rgb(source), ""  # data/images.py: the decoder every step shares
    except FileNotFoundError:
        return None, "not found"
    except Exception as exc:  # PIL raises many types for bad data; all mean "unusable"
        return None, f"{type(exc).__name__}: {exc}"


def _skipped(path: str, reason: str) -> dict:
    return {"skipped": True, "path": path, "reason": reason}


def _make_sample(path: str, labels: torch.Tensor, image: Image.Image, transform, seed: int) -> dict:
    if transform is None:
        return {"path": path, "labels": labels, "image": pil_to_tensor(image)}
    out = transform(image, seed)
    if not isinstance(out, dict):
        raise TypeError(f"weak-data transform must return a dict, got {type(out).__name__}")
    return {"path": path, "labels": labels, **out}


class WeakLabelFolder(Dataset):
    """Images listed in a ``labels.jsonl`` file with their noisy tags.

    ``dataset[i]`` or ``dataset[(i, sample_seed)]`` (the form
    :class:`DeterministicBatchSampler` yields). With a plain int the seed is ``i``.
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
            _check_labels(self.records, vocab, labels_file)
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
        image, reason = _try_open(record.image)
        if image is None:
            return _skipped(record.image, reason)
        labels = self.vocab.encode(record.labels)
        return _make_sample(record.image, labels, image, self.transform, seed)


# --------------------------------------------------------------------------------------
# WebDataset shards
# --------------------------------------------------------------------------------------


def _json_labels(data: bytes, vocab: Vocabulary, where: str) -> tuple[torch.Tensor, str | None]:
    try:
        meta = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LabelFileError(f'{where}: field "json": invalid JSON ({exc})') from None
    names = meta.get("labels") if isinstance(meta, dict) else meta
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        got = _show(names)
        raise LabelFileError(f'{where}: field "labels": expected a list of strings, got {got}')
    for name in names:
        if name not in vocab:
            raise LabelFileError(
                f'{where}: field "labels": unknown label {name!r} '
                f"(not in the vocabulary of {len(vocab)} classes)"
            )
    path = meta.get("path") if isinstance(meta, dict) else None
    return vocab.encode(names), path if isinstance(path, str) else None


def _cls_labels(data: bytes, vocab: Vocabulary, where: str) -> torch.Tensor:
    text = data.decode("utf-8", "replace").strip()
    try:
        return vocab.encode_indices(int(part) for part in text.split(",") if part.strip())
    except (ValueError, IndexError) as exc:
        raise LabelFileError(f'{where}: field "cls": {exc} (value {text!r})') from None


def _shard_labels(raw: dict, vocab: Vocabulary, where: str) -> tuple[torch.Tensor, str | None]:
    """Labels (and stored source path, if any) from ``json`` names or ``cls`` indices.

    Bad labels raise rather than skip: they are a data-preparation bug, not a bad image.
    """
    if "json" in raw:
        return _json_labels(raw["json"], vocab, where)
    if "cls" in raw:
        return _cls_labels(raw["cls"], vocab, where), None
    fields = sorted(k for k in raw if not k.startswith("__"))
    raise LabelFileError(f'{where}: no labels: expected a "json" or "cls" entry, found {fields}')


DAMAGED = "__damaged_shard__"  # the stream item that stands for the unread rest of a shard


def _shard_samples(url: str) -> Iterator[dict]:
    """The samples of one shard; if it is truncated or corrupt, the samples before the damage,
    then one ``DAMAGED`` item naming it (the rest of that shard is skipped, not the run).

    One shard at a time, so a sample cut short at the damage is never joined to the next
    shard's first sample (webdataset groups files by key across a shard boundary)."""
    errors: list[Exception] = []

    def stop(exc: Exception) -> bool:
        errors.append(exc)
        return False

    n = 0
    for raw in wds.tarfile_samples(iter([{"url": url}]), handler=stop):
        n += 1
        yield raw
    if errors:
        reason = str(errors[0].args[0]) if errors[0].args else type(errors[0]).__name__
        yield {DAMAGED: url, "__url__": url, "reason": f"damaged shard ({type(errors[0]).__name__}: "
               f"{reason.split(' @ ')[0][:120]}); its samples after the first {n} were skipped"}


def _decode_shard_sample(raw: dict, vocab: Vocabulary, transform, seed: int, shards: int = 0) -> dict:
    if DAMAGED in raw:
        return {**_skipped(raw[DAMAGED], raw["reason"]), "shards": shards}
    url, key = raw.get("__url__", "?"), raw.get("__key__", "?")
    where = f"{url}: sample {key}"
    labels, source_path = _shard_labels(raw, vocab, where)
    path = source_path or f"{url}#{key}"
    ext = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
    if ext is None:
        fields = sorted(k for k in raw if not k.startswith("__"))
        return _skipped(path, f"no image entry in shard sample {where} (found {fields})")
    image, reason = _try_open(io.BytesIO(raw[ext]))
    if image is None:
        return _skipped(path, f"{reason} ({where})")
    return _make_sample(path, labels, image, transform, seed)


def urls_of_stream(urls: Sequence[str], seed: int, epoch: int, rank: int, world_size: int, stream: int,
                   streams: int) -> list[str]:
    """The shards one loader stream reads in a pass: shuffled by (seed, epoch), then split by
    rank and stream."""
    urls = list(urls)
    random.Random(derive_seed("shards", seed, epoch)).shuffle(urls)
    return urls[rank::world_size][stream::streams]


class WeakShardDataset(IterableDataset):
    """Stream of weak samples from WebDataset shards.

    Shards are shuffled per pass with a seed shared by all ranks, then split by DDP rank
    (``RANK``/``WORLD_SIZE`` or ``torch.distributed``) and DataLoader worker using
    webdataset's splitting rule (``urls[rank::world][stream::workers]``); samples go through
    a seeded shuffle buffer. Each sample's seed is ``derive_seed(seed, rank, stream, n)``
    with ``n`` the running sample index of that stream, so a fixed setup reproduces its
    augmentations. ``repeat=True`` loops forever (fresh shard order each pass), for
    iteration-based training.

    Exact resume (:meth:`resumed_at`): a DataLoader hands out batch ``j`` from worker
    ``j % workers``, each worker batching its own stream. Resuming at iteration ``k``, worker
    ``w`` therefore plays stream ``(w + k) % workers`` and first reads past (without decoding)
    the batches that stream gave before ``k``; the shuffle buffer and sample seeds then
    continue exactly where the uninterrupted run was.
    """

    def __init__(
        self,
        urls: Sequence[str],
        vocab: Vocabulary,
        transform: Transform | None = None,
        seed: int = 0,
        shuffle: int = 1000,
        repeat: bool = False,
    ):
        if not urls:
            raise ValueError("no shards given")
        self.urls = list(urls)
        self.vocab = vocab
        self.transform = transform
        self.seed = seed
        self.shuffle = shuffle
        self.repeat = repeat
        self.start_iter = 0
        self.batch_size = 1

    def resumed_at(self, start_iter: int, batch_size: int) -> "WeakShardDataset":
        """A copy whose DataLoader's first batch is batch ``start_iter`` of the full run."""
        other = copy.copy(self)
        other.start_iter, other.batch_size = int(start_iter), int(batch_size)
        return other

    def _raw_samples(self, epoch: int, rank: int, world_size: int, stream: int,
                     streams: int) -> Iterator[dict]:
        shards = urls_of_stream(self.urls, self.seed, epoch, rank, world_size, stream, streams)
        samples = itertools.chain.from_iterable(_shard_samples(url) for url in shards)
        if self.shuffle > 1:
            rng = random.Random(derive_seed("samples", self.seed, epoch, rank, stream))
            samples = wds.shuffle(self.shuffle, rng=rng)(samples)
        return samples

    def check_split(self, world_size: int, workers: int) -> None:
        """Every rank (and, for training, every loader worker) needs a shard of its own."""
        if len(self.urls) < world_size:
            raise UserError(
                f"{len(self.urls)} shard(s) cannot be split over {world_size} ranks: "
                "write at least one shard per rank (smaller shard_size)"
            )
        if self.repeat and len(self.urls) < world_size * max(workers, 1):
            # A worker without shards drops out of the DataLoader's rotation, which would
            # make batch order (and so resume) depend on timing.
            raise UserError(
                f"{len(self.urls)} shard(s) cannot feed {world_size} rank(s) x {workers} loader "
                "worker(s): write at least one shard per worker (smaller shard_size) or lower "
                "train.num_workers"
            )

    def __iter__(self) -> Iterator[dict]:
        rank, world_size, worker, workers = pytorch_worker_info()
        self.check_split(world_size, workers)
        stream = (worker + self.start_iter) % workers
        skip = len(range(stream, self.start_iter, workers)) * self.batch_size
        n = 0
        for epoch in itertools.count():
            start = n
            for raw in self._raw_samples(epoch, rank, world_size, stream, workers):
                if n >= skip:
                    seed = derive_seed("sample", self.seed, rank, stream, n)
                    yield _decode_shard_sample(raw, self.vocab, self.transform, seed, len(self.urls))
                n += 1
            if n == start and self.repeat:
                # a worker with nothing to read drops out of the DataLoader's rotation, and the
                # batch order (so resume) would then depend on timing
                shards = urls_of_stream(self.urls, self.seed, epoch, rank, world_size, stream, workers)
                raise UserError(
                    f"loader worker {worker} of rank {rank} has only empty shards ({', '.join(shards)}): "
                    "remove empty shards, or lower train.num_workers so each worker reads a shard with samples")
            if not self.repeat or n == start:
                return


class ShardSampleList(Dataset):
    """The first ``limit`` samples of some shards (in shard order), kept as their encoded bytes and
    decoded when read: a bounded held-out set from a shard pattern that a map-style loader
    indexes like a folder, ``dataset[i]`` or ``dataset[(i, sample_seed)]``."""

    def __init__(self, urls: Sequence[str], vocab: Vocabulary, transform: Transform | None, limit: int):
        stream = itertools.chain.from_iterable(_shard_samples(url) for url in urls)
        self.raw = [raw for raw in itertools.islice(stream, limit) if DAMAGED not in raw]
        self.vocab, self.transform = vocab, transform

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, seed = (int(key[0]), int(key[1])) if isinstance(key, (tuple, list)) else (int(key), int(key))
        return _decode_shard_sample(self.raw[index], self.vocab, self.transform, seed)


def heldout_dataset(source: str | Path, vocab: Vocabulary, transform: Transform | None,
                    limit: int) -> Dataset:
    """The first ``limit`` samples of a held-out ``labels.jsonl`` or shard set, map-style and
    decoded when read: what the pretext diagnostics measure on, at any data set size."""
    if str(source).endswith(".jsonl"):
        dataset = WeakLabelFolder(source, vocab, transform)
        dataset.records = dataset.records[:limit]
        return dataset
    urls = expand_shards(source)
    _check_shards_exist(urls)
    return ShardSampleList(urls, vocab, transform, limit)


def weak_webdataset(
    urls: str | Sequence[str],
    vocab: Vocabulary,
    transform: Transform | None = None,
    seed: int = 0,
    shuffle: int = 1000,
    *,
    repeat: bool = False,
) -> WeakShardDataset:
    """Weak samples from shards (a list, a brace pattern, a glob or a directory)."""
    return WeakShardDataset(expand_shards(urls), vocab, transform, seed, shuffle, repeat)


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def expand_shards(source: str | Path | Sequence[str | Path]) -> list[str]:
    """Shard URLs from a list, a ``{000..009}`` brace pattern, a glob or a directory."""
    if isinstance(source, (list, tuple)):
        return [url for item in source for url in expand_shards(item)]
    source = str(source)
    if _is_local(source) and os.path.isdir(source):
        urls = sorted(glob.glob(os.path.join(source, "*.tar")))
        if not urls:
            raise InputNotFound(f"no .tar shards in directory {source}")
        return urls
    if "{" in source or "::" in source:
        return list(expand_urls(source))
    if _is_local(source) and any(c in source for c in "*?["):
        urls = sorted(glob.glob(source))
        if not urls:
            raise InputNotFound(f"no shards match {source}")
        return urls
    return [source]


def _check_shards_exist(urls: Sequence[str]) -> None:
    missing = [u for u in urls if _is_local(u) and not os.path.isfile(u)]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        shown = ", ".join(missing[:3])
        raise InputNotFound(f"{len(missing)} shard(s) not found: {shown}{more} (data.train: a "
                            "labels.jsonl, a shard pattern or a folder of .tar shards)")


def _shard_vocab(urls: Sequence[str], vocab: Vocabulary | None) -> Vocabulary:
    if vocab is not None:
        return vocab
    first = urls[0]
    candidate = os.path.join(os.path.dirname(first), "vocab.json") if _is_local(first) else None
    if candidate and os.path.isfile(candidate):
        return Vocabulary.load_json(candidate)
    raise LabelFileError(
        f"shards {first!r}...: no vocabulary. Shards carry label names, so the class list must "
        "be fixed up front: put a vocab.json (JSON list of names) next to the shards "
        "(write_webdataset_shards does) or pass vocab="
    )


def build_weak_dataset(
    source: str | Path | Sequence[str | Path],
    vocab: Vocabulary | None = None,
    transform: Transform | None = None,
    seed: int = 0,
    *,
    shuffle: int = 1000,
    repeat: bool = False,
    image_root: str | Path | None = None,
) -> tuple[Dataset | IterableDataset, Vocabulary]:
    """Folder (``*.jsonl``) or shards (anything else), with the vocabulary it uses.

    ``seed``, ``shuffle`` and ``repeat`` apply to shards only: folders are ordered by a
    :class:`DeterministicBatchSampler`.
    """
    if isinstance(source, (str, Path)) and str(source).endswith(".jsonl"):
        dataset = WeakLabelFolder(source, vocab, transform, image_root)
        return dataset, dataset.vocab
    urls = expand_shards(source)
    _check_shards_exist(urls)
    vocab = _shard_vocab(urls, vocab)
    return WeakShardDataset(urls, vocab, transform, seed, shuffle, repeat), vocab


def write_webdataset_shards(
    labels_file: str | Path,
    out_dir: str | Path,
    shard_size: int = 1000,
    *,
    image_root: str | Path | None = None,
    vocab: Vocabulary | None = None,
) -> list[str]:
    """Convert a folder + labels.jsonl set into ``shard-NNNNNN.tar`` files and ``vocab.json``.

    Image bytes are copied unchanged (a corrupt image stays corrupt and is counted as
    skipped when read). Each sample's ``json`` holds ``{"labels": [...], "path": <path
    relative to the image root>}`` so shard samples report the same paths as the folder.
    Missing image files cannot be copied: they are left out with a warning.
    """
    labels_file = Path(labels_file)
    root = Path(image_root) if image_root is not None else labels_file.parent
    records = read_labels_jsonl(labels_file, image_root)
    if vocab is None:
        vocab = Vocabulary.build(records)
    else:
        _check_labels(records, vocab, labels_file)
    out_dir = Path(out_dir)
    if out_dir.is_dir() and (any(out_dir.glob("*.tar")) or (out_dir / "vocab.json").exists()):
        raise OutputExists(f"{out_dir} already holds shards; give a new or empty --out folder "
                           "(or delete the old shards first)")
    if shard_size <= 0:
        raise UserError(f"shard_size={shard_size}: must be a positive number of images")
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    try:
        missing = _write_shards(records, root, out_dir, shard_size, written)
        if written:
            vocab.save_json(out_dir / "vocab.json")
    except BaseException as exc:
        # No partial output: a half-written set of shards would read as a smaller data set.
        current = sorted(out_dir.glob("shard-*.tar"))
        failing = getattr(exc, "filename", None) or (current[-1] if current else out_dir)
        for path in [*written, *map(str, out_dir.glob("shard-*.tar")), str(out_dir / "vocab.json")]:
            Path(path).unlink(missing_ok=True)
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)
        if is_disk_full(exc):
            raise disk_full(failing) from exc
        raise
    if missing:
        warnings.warn(
            f"write_webdataset_shards: {len(missing)} image(s) not found and left out, "
            f"e.g. {missing[:3]}",
            stacklevel=2,
        )
    if not written:
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise InputNotFound(f"{labels_file}: none of the listed images exist; nothing written")
    return written


def _write_shards(records: list[WeakRecord], root: Path, out_dir: Path, shard_size: int,
                  written: list[str]) -> list[str]:
    """Write the shards (their paths appended to ``written``); returns the missing images."""
    missing: list[str] = []
    pattern = str(out_dir / "shard-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=shard_size, verbose=0, post=written.append) as sink:
        for i, record in enumerate(records):
            try:
                data = Path(record.image).read_bytes()
            except OSError:
                missing.append(record.image)
                continue
            ext = Path(record.image).suffix.lower().lstrip(".")
            meta = {"labels": record.labels, "path": os.path.relpath(record.image, root)}
            sink.write({
                "__key__": f"{i:09d}",
                ext if ext in IMAGE_EXTENSIONS else "img": data,
                "json": json.dumps(meta).encode(),
            })
    return missing


# --------------------------------------------------------------------------------------
# Batching, skip counting, deterministic sampling
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
