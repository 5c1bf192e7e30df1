"""The weak data a run asks for, from a labels file or shards: the training set and the bounded
held-out sets of the pretext diagnostics."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from torch.utils.data import Dataset, IterableDataset

from predet.data.shards import (
    ShardSampleList,
    WeakShardDataset,
    check_shards_exist,
    expand_shards,
    shard_vocab,
)
from predet.data.weak import Transform, Vocabulary, WeakLabelFolder


def heldout_dataset(source: str | Path, vocab: Vocabulary, transform: Transform | None,
                    limit: int) -> Dataset:
    """The first ``limit`` samples of a held-out ``labels.jsonl`` or shard set, map-style and
    decoded when read: what the pretext diagnostics measure on, at any data set size."""
    if str(source).endswith(".jsonl"):
        dataset = WeakLabelFolder(source, vocab, transform)
        dataset.records = dataset.records[:limit]
        return dataset
    urls = expand_shards(source)
    check_shards_exist(urls)
    return ShardSampleList(urls, vocab, transform, limit)


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
    :class:`~predet.data.samplers.DeterministicBatchSampler`.
    """
    if isinstance(source, (str, Path)) and str(source).endswith(".jsonl"):
        dataset = WeakLabelFolder(source, vocab, transform, image_root)
        return dataset, dataset.vocab
    urls = expand_shards(source)
    check_shards_exist(urls)
    vocab = shard_vocab(urls, vocab)
    return WeakShardDataset(urls, vocab, transform, seed, shuffle, repeat), vocab
