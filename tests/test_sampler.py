"""Length grouping: similar lengths share a batch, but the order is reshuffled every epoch."""

from __future__ import annotations

import numpy as np

from vlm_sweep.data.sampler import ShardedIndexSampler


def _batches(order, size):
    return [order[i:i + size] for i in range(0, len(order), size)]


def test_grouped_batches_are_not_longest_first_and_change_every_epoch():
    lengths = np.random.default_rng(0).integers(10, 1000, size=64).tolist()
    sampler = ShardedIndexSampler(64, seed=0, lengths=lengths, batch_size=4)  # one chunk holds everything
    firsts = []
    for epoch in range(4):
        order = sampler.epoch_order(epoch)
        assert sorted(order) == list(range(64))
        batches = _batches(order, 4)
        # Each batch is length-homogeneous: consecutive in the sorted chunk.
        ranks = {i: r for r, i in enumerate(sorted(range(64), key=lambda i: -lengths[i]))}
        for batch in batches:
            assert max(ranks[i] for i in batch) - min(ranks[i] for i in batch) == 3
        maxima = [max(lengths[i] for i in b) for b in batches]
        assert maxima != sorted(maxima, reverse=True), "batches still run longest first"
        firsts.append(tuple(order[:4]))
    assert len(set(firsts)) > 1, "the same batch opens every epoch"


def test_grouped_order_is_a_pure_function_of_seed_epoch_rank():
    lengths = list(range(100))
    a = ShardedIndexSampler(100, seed=3, rank=1, world_size=2, lengths=lengths, batch_size=2)
    b = ShardedIndexSampler(100, seed=3, rank=1, world_size=2, lengths=lengths, batch_size=2)
    assert a.epoch_order(5) == b.epoch_order(5)
