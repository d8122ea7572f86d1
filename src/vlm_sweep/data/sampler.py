"""A seeded, rank-sharded, endless stream of sample indices.

Deterministic in (seed, epoch, rank, world size) and nothing else, so a
``StatefulDataLoader`` restores its position exactly by replaying the index
stream (cheap: indices, not data). Optional length grouping puts samples of
similar size side by side to cut padding: within large random chunks samples are
sorted by length and cut into global batches, and those batches are then shuffled
(seeded by the epoch), so batches are length-homogeneous without the run always
going longest-first in the same order.
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
        self.lengths = None if lengths is None else np.asarray(lengths)
        self.global_batch = batch_size * world_size
        self.group = self.global_batch * group_batches

    def epoch_order(self, epoch: int) -> List[int]:
        """This rank's indices for one epoch."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.num_samples)
        if self.lengths is not None:
            order = self._grouped(order, rng)
        pad = (-len(order)) % self.world_size
        if pad:  # repeat cyclically so every rank gets the same number of samples
            order = np.resize(order, len(order) + pad)
        return order[self.rank::self.world_size].tolist()

    def _grouped(self, order: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Sort within random chunks, cut into global batches, shuffle the batches."""
        batches = []
        for i in range(0, len(order), self.group):
            chunk = order[i:i + self.group]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            batches += [chunk[j:j + self.global_batch] for j in range(0, len(chunk), self.global_batch)]
        # Full batches in random order; a short remainder batch (if any) stays last.
        full = [b for b in batches if len(b) == self.global_batch]
        rest = [b for b in batches if len(b) != self.global_batch]
        shuffled = [full[k] for k in rng.permutation(len(full))] + rest
        return np.concatenate(shuffled) if shuffled else order

    def __iter__(self) -> Iterator[int]:
        epoch = 0
        while True:
            yield from self.epoch_order(epoch)
            epoch += 1
