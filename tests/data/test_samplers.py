"""The batch samplers: iteration i depends only on (seed, i), so a resume reads what an
uninterrupted run would, ranks partition one global batch, and LVIS repeat factors oversample
rare categories by the formula."""

import math
from collections import Counter

import pytest
import torch

from predet.data.samplers import (
    DeterministicBatchSampler,
    RepeatFactorBatchSampler,
    repeat_factors,
)


def _take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_sampler_resume_equals_tail_of_full_run():
    full = _take(DeterministicBatchSampler(10, 3, seed=7), 12)
    resumed = _take(DeterministicBatchSampler(10, 3, seed=7, start_iter=5), 7)
    assert resumed == full[5:]
    assert _take(DeterministicBatchSampler(10, 3, seed=8), 12) != full


def test_sampler_epochs_are_permutations():
    n, bs = 12, 4
    stream = [i for batch in _take(DeterministicBatchSampler(n, bs, seed=1), 9) for i, _ in batch]
    epochs = [stream[k : k + n] for k in range(0, len(stream), n)]
    assert all(sorted(e) == list(range(n)) for e in epochs)
    assert epochs[0] != epochs[1]


def test_sampler_ranks_partition_the_global_batch():
    n, bs, world, iters = 12, 3, 2, 10  # global batch 6 divides 12: no batch straddles epochs
    ranks = [_take(DeterministicBatchSampler(n, bs, seed=3, rank=r, world_size=world), iters) for r in range(world)]
    reference = DeterministicBatchSampler(n, bs, seed=3, world_size=world)
    stream = []
    for it in range(iters):
        a, b = ranks[0][it], ranks[1][it]
        assert len(a) == len(b) == bs
        assert a + b == reference.global_batch(it)
        assert not {i for i, _ in a} & {i for i, _ in b}
        seeds = [s for _, s in a + b]
        assert len(set(seeds)) == len(seeds)
        stream += [i for i, _ in a + b]
    for k in range(0, len(stream), n):  # together the ranks see every index once per epoch
        assert sorted(stream[k : k + n]) == list(range(n))


def test_repeat_factors_formula():
    # 10 images: category 1 in all of them, 2 in one, 3 in two; the last image is empty.
    labels = [[1]] * 7 + [[1, 2], [1, 3, 3], [3]]
    labels[6] = []
    t = 0.5
    r = repeat_factors(labels, threshold=t)
    f = {1: 9 / 10, 2: 1 / 10, 3: 2 / 10}
    rc = {c: max(1.0, math.sqrt(t / fc)) for c, fc in f.items()}
    expected = [rc[1]] * 6 + [1.0, max(rc[1], rc[2]), max(rc[1], rc[3]), rc[3]]
    assert r.tolist() == pytest.approx(expected, rel=1e-6)
    assert rc[2] == pytest.approx(math.sqrt(5)) and rc[1] == 1.0


def test_rfs_sampler_resume_and_oversampling():
    factors = torch.tensor([1.0] * 8 + [3.5, 1.5])
    straight = RepeatFactorBatchSampler(factors, batch_size=3, seed=4)
    it = iter(straight)
    run = [next(it) for _ in range(40)]
    resumed = iter(RepeatFactorBatchSampler(factors, batch_size=3, seed=4, start_iter=25))
    assert [next(resumed) for _ in range(15)] == run[25:]
    ranks = [RepeatFactorBatchSampler(factors, 3, seed=4, rank=k, world_size=2) for k in (0, 1)]
    global_batch = ranks[0].global_batch(7)
    assert ranks[0].batch(7) + ranks[1].batch(7) == global_batch
    counts = Counter(index for batch in run for index, _ in batch)
    assert counts[8] > 2.5 * max(counts[i] for i in range(8))
    assert len({seed for batch in run for _, seed in batch}) == 120
    other = iter(RepeatFactorBatchSampler(factors, batch_size=3, seed=5))
    assert [next(other) for _ in range(5)] != run[:5]
