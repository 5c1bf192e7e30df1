"""Which sample each rank reads at each iteration, and with what seed: batch samplers whose
iteration ``i`` depends only on (seed, i), so a resumed run reads exactly what an uninterrupted
one would have, and every rank keeps its slice of one global batch. Used by both halves:
pre-training (plain permutations) and fine-tuning (plain, or LVIS repeat-factor epochs).
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import math
from collections import Counter
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch.utils.data import Sampler

__all__ = ["DeterministicBatchSampler", "RepeatFactorBatchSampler", "derive_seed", "repeat_factors"]


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed that depends only on ``parts``.

    Hashing (rather than adding offsets to a base seed) keeps seeds of neighbouring
    iterations, ranks and workers unrelated, and is stable across processes and Python
    runs (unlike ``hash()``).
    """
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class DeterministicBatchSampler(Sampler):
    """Infinite batches of ``(index, sample_seed)``; iteration ``i`` depends only on (seed, i).

    The global sample stream is the concatenation of permutations of ``range(num_samples)``,
    one per epoch, each from (seed, epoch). Iteration ``i`` takes positions
    ``[i*G, (i+1)*G)`` of that stream (``G = batch_size * world_size``) and this rank keeps
    its ``batch_size`` slice. The sample seed hashes (seed, i, position in the global batch).
    Because nothing depends on what was yielded before, ``start_iter=k`` resumes exactly.
    Use as ``DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_weak)``.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        seed: int = 0,
        start_iter: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        if num_samples <= 0 or batch_size <= 0:
            raise ValueError(f"need num_samples, batch_size > 0, got {num_samples}, {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        if start_iter < 0:
            raise ValueError(f"start_iter must be >= 0, got {start_iter}")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.start_iter = start_iter
        self.rank = rank
        self.world_size = world_size
        self._perms: dict[int, torch.Tensor] = {}
        super().__init__()

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            while len(self._perms) >= 2:  # a batch spans at most two consecutive epochs
                self._perms.pop(min(self._perms))
            gen = torch.Generator().manual_seed(derive_seed("epoch", self.seed, epoch))
            self._perms[epoch] = torch.randperm(self.num_samples, generator=gen)
        return self._perms[epoch]

    def _item(self, iteration: int, pos: int) -> tuple[int, int]:
        epoch, offset = divmod(iteration * self.global_batch_size + pos, self.num_samples)
        return int(self._perm(epoch)[offset]), derive_seed("sample", self.seed, iteration, pos)

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def global_batch(self, iteration: int) -> list[tuple[int, int]]:
        """The batch of all ranks together at ``iteration``."""
        return [self._item(iteration, pos) for pos in range(self.global_batch_size)]

    def batch(self, iteration: int) -> list[tuple[int, int]]:
        """This rank's slice of the global batch at ``iteration``."""
        start = self.rank * self.batch_size
        return [self._item(iteration, pos) for pos in range(start, start + self.batch_size)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for iteration in itertools.count(self.start_iter):
            yield self.batch(iteration)


def _repeat_factors(image_labels: Sequence[Iterable[int]], threshold: float) -> torch.Tensor:
    if threshold <= 0:
        raise ValueError(f"threshold must be > 0, got {threshold}")
    n = len(image_labels)
    if n == 0:
        raise ValueError("cannot compute repeat factors of an empty dataset")
    per_image = [set(int(c) for c in labels) for labels in image_labels]
    image_freq = Counter(c for cats in per_image for c in cats)
    cat_factor = {c: max(1.0, math.sqrt(threshold / (k / n))) for c, k in image_freq.items()}
    return torch.tensor([max((cat_factor[c] for c in cats), default=1.0) for cats in per_image],
                        dtype=torch.float32)


def repeat_factors(dataset: Any, threshold: float = 0.001) -> torch.Tensor:
    """Per-image repeat factors (LVIS paper, Detectron2's RepeatFactorTrainingSampler).

    f(c) is the fraction of the dataset's images (empty ones included) whose training
    targets contain c; r(c) = max(1, sqrt(threshold / f(c))); an image repeats by the max
    r(c) over its categories, 1 without any. ``dataset`` is a :class:`CocoDetection` or a
    sequence of per-image category collections.
    """
    labels = dataset.image_labels() if hasattr(dataset, "image_labels") else list(dataset)
    return _repeat_factors(labels, threshold)


def _epoch_counts(factors: torch.Tensor, seed: int, epoch: int) -> torch.Tensor:
    """Stochastic rounding: image i appears floor(r) times, plus once more with prob. frac(r)."""
    gen = torch.Generator().manual_seed(derive_seed("rfs-round", seed, epoch))
    whole = factors.floor()
    extra = torch.rand(len(factors), generator=gen, dtype=torch.float64) < (factors - whole)
    return whole.long() + extra.long()


def _epoch_indices(factors: torch.Tensor, seed: int, epoch: int) -> torch.Tensor:
    """The image indices of one repeat-factor epoch, shuffled; depends only on (seed, epoch)."""
    counts = _epoch_counts(factors, seed, epoch)
    indices = torch.repeat_interleave(torch.arange(len(factors)), counts)
    gen = torch.Generator().manual_seed(derive_seed("epoch", seed, epoch))
    return indices[torch.randperm(len(indices), generator=gen)]


class RepeatFactorBatchSampler(DeterministicBatchSampler):
    """:class:`DeterministicBatchSampler` over repeat-factor epochs instead of plain permutations.

    Epoch e is the stochastic rounding of ``repeat_factors`` from (seed, e), shuffled by a
    permutation from (seed, e); epochs have different lengths, so the epoch of a stream
    position is found from their cumulative lengths (computed from the roundings alone).
    Iteration i still depends only on (seed, i): ``start_iter=k`` resumes exactly, and each
    rank keeps its slice of the global batch.
    """

    def __init__(
        self,
        repeat_factors: torch.Tensor | Sequence[float],
        batch_size: int,
        seed: int = 0,
        start_iter: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        factors = torch.as_tensor(repeat_factors, dtype=torch.float64).flatten()
        if len(factors) and (not torch.isfinite(factors).all() or (factors < 1).any()):
            raise ValueError("repeat factors must be finite and >= 1")
        super().__init__(len(factors), batch_size, seed, start_iter, rank, world_size)
        self.repeat_factors = factors
        self._starts = [0]  # stream position at which each epoch begins (one more than known epochs)

    def _epoch_of(self, position: int) -> int:
        while self._starts[-1] <= position:
            epoch = len(self._starts) - 1
            self._starts.append(self._starts[-1] + int(_epoch_counts(self.repeat_factors, self.seed, epoch).sum()))
        return bisect.bisect_right(self._starts, position) - 1

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            while len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = _epoch_indices(self.repeat_factors, self.seed, epoch)
        return self._perms[epoch]

    def _item(self, iteration: int, pos: int) -> tuple[int, int]:
        position = iteration * self.global_batch_size + pos
        epoch = self._epoch_of(position)
        index = int(self._perm(epoch)[position - self._starts[epoch]])
        return index, derive_seed("sample", self.seed, iteration, pos)
