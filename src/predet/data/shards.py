"""Weak-label data streamed from WebDataset tar shards: each rank and loader worker reads its own
shards (shuffled per pass with a seed all ranks share), resumes at an iteration, and skips and
names a damaged shard; plus writing shards from a labels file (``predet data shards``)."""

from __future__ import annotations

import copy
import glob
import io
import itertools
import json
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import torch
import webdataset as wds
from torch.utils.data import Dataset, IterableDataset
from webdataset.shardlists import expand_urls
from webdataset.utils import pytorch_worker_info

from predet.data.samplers import derive_seed
from predet.data.weak import (
    IMAGE_EXTENSIONS,
    LabelFileError,
    Transform,
    Vocabulary,
    WeakRecord,
    check_labels,
    make_sample,
    read_labels_jsonl,
    show_value,
    skipped_sample,
    try_open,
)
from predet.errors import (
    InputNotFound,
    OutputExists,
    UserError,
    disk_full,
    is_disk_full,
)


def _json_labels(data: bytes, vocab: Vocabulary, where: str) -> tuple[torch.Tensor, str | None]:
    try:
        meta = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LabelFileError(f'{where}: field "json": invalid JSON ({exc})') from None
    names = meta.get("labels") if isinstance(meta, dict) else meta
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        got = show_value(names)
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


def decode_shard_sample(raw: dict, vocab: Vocabulary, transform, seed: int, shards: int = 0) -> dict:
    if DAMAGED in raw:
        return {**skipped_sample(raw[DAMAGED], raw["reason"]), "shards": shards}
    url, key = raw.get("__url__", "?"), raw.get("__key__", "?")
    where = f"{url}: sample {key}"
    labels, source_path = _shard_labels(raw, vocab, where)
    path = source_path or f"{url}#{key}"
    ext = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
    if ext is None:
        fields = sorted(k for k in raw if not k.startswith("__"))
        return skipped_sample(path, f"no image entry in shard sample {where} (found {fields})")
    image, reason = try_open(io.BytesIO(raw[ext]))
    if image is None:
        return skipped_sample(path, f"{reason} ({where})")
    return make_sample(path, labels, image, transform, seed)


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
                    yield decode_shard_sample(raw, self.vocab, self.transform, seed, len(self.urls))
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
        return decode_shard_sample(self.raw[index], self.vocab, self.transform, seed)


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


def check_shards_exist(urls: Sequence[str]) -> None:
    missing = [u for u in urls if _is_local(u) and not os.path.isfile(u)]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        shown = ", ".join(missing[:3])
        raise InputNotFound(f"{len(missing)} shard(s) not found: {shown}{more} (data.train: a "
                            "labels.jsonl, a shard pattern or a folder of .tar shards)")


def shard_vocab(urls: Sequence[str], vocab: Vocabulary | None) -> Vocabulary:
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
        check_labels(records, vocab, labels_file)
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
