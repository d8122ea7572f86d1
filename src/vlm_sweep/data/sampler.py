"""A seeded, rank-sharded, endless stream of sample indices.

Deterministic in (seed, epoch, rank, world size) and nothing else, so a
``StatefulDataLoader`` restores its position exactly by replaying the index
stream (cheap: indices, not data). Optional length grouping puts samples of
similar size side by side to cut padding.
"""

from __future__ import annotations

from typing import Iterator, List, Optional, Sequence

import numpy as np


class ShardedIndexSampler:
    """Endless epochs; each epoch a fresh seeded permutation split across ranks."""

    def __init__(
        self,
        num_samples: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        lengths: Optional[Sequence[int]] = None,
        batch_size: int = 1,
        group_batches: int = 50,
    ) -> None:
        if num_samples <= 0:
            raise ValueError("cannot sample from an empty data set")
        self.num_samples = num_samples
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.lengths = None if lengths is None else np.asarray(lengths)
        self.group = batch_size * world_size * group_batches

    def epoch_order(self, epoch: int) -> List[int]:
        """This rank's indices for one epoch."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.num_samples) if self.shuffle else np.arange(self.num_samples)
        if self.lengths is not None:
            # Sort within large random chunks (longest first), keeping randomness across chunks.
            chunks = [order[i:i + self.group] for i in range(0, len(order), self.group)]
            order = np.concatenate([c[np.argsort(-self.lengths[c], kind="stable")] for c in chunks])
        pad = (-len(order)) % self.world_size
        if pad:  # repeat cyclically so every rank gets the same number of samples
            order = np.resize(order, len(order) + pad)
        return order[self.rank::self.world_size].tolist()

    def __iter__(self) -> Iterator[int]:
        epoch = 0
        while True:
            yield from self.epoch_order(epoch)
            epoch += 1
