"""Per-record model inputs, encoded once and merged into batches.

Templating, tokenising and resizing/normalising a record's images is most of the data path's
CPU time (~7 ms of a tiny Gemma 3 micro-batch of 2, against ~1.3 ms to read and decode the
record). Training visits every record once per epoch with the same processor settings, so the
collator encodes each record on its own, keeps the result in a ``FeatureCache`` (per DataLoader
worker, alive across epochs with persistent workers, bounded by ``dataset.feature_cache_mb``)
and builds a batch by merging per-record features: sequence tensors are right-padded, media
tensors concatenated in record order — exactly what the processor returns for the batch
(a test holds every family to that).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence

import torch

Features = Dict[str, torch.Tensor]
# Per process (each DataLoader worker holds its own): a tiny model's 64 receipts take ~5 MiB;
# one 896x896 Gemma 3 image is ~9 MiB of fp32 pixels, so 1 GiB keeps ~100 such records.
DEFAULT_FEATURE_CACHE_MB = 1024.0


def _nbytes(features: Features) -> int:
    return sum(t.numel() * t.element_size() for t in features.values() if torch.is_tensor(t))


class FeatureCache:
    """Encoded records by record id, up to a byte budget; once full it keeps what it has.

    Keeping the first records instead of evicting keeps the hit rate at budget/data size
    without churn (an LRU over a shuffled epoch misses almost every time once it overflows).
    """

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = max(int(budget_bytes), 0)
        self.used_bytes = 0
        self._entries: "OrderedDict[str, Features]" = OrderedDict()

    def get(self, key: str) -> Optional[Features]:
        return self._entries.get(key)

    def put(self, key: str, features: Features) -> None:
        size = _nbytes(features)
        if key in self._entries or self.used_bytes + size > self.budget_bytes:
            return
        self._entries[key] = features
        self.used_bytes += size

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries


def _is_sequence(value: Any, length: int) -> bool:
    """A per-position tensor of one record: shape (1, length)."""
    return torch.is_tensor(value) and value.dim() == 2 and value.shape == (1, length)


def merge_features(records: Sequence[Features], pad_token_id: int) -> Features:
    """One batch from per-record features (each encoded alone, batch size 1).

    Per-position tensors (input ids, attention mask, token types) are right-padded to the
    longest record (ids with the pad token, the rest with 0); everything else (pixel values,
    image/video grids, ...) is concatenated along its first dimension in record order, as
    the processor lays out a batch's media (records without media add nothing).
    """
    if not records:
        return {}
    longest = max(r["input_ids"].shape[1] for r in records)
    keys = list(dict.fromkeys(k for r in records for k in r))
    batch: Features = {}
    for key in keys:
        holders = [r for r in records if key in r]
        values = [r[key] for r in holders]
        if len(holders) == len(records) and all(_is_sequence(v, r["input_ids"].shape[1])
                                                for v, r in zip(values, holders)):
            fill = pad_token_id if key == "input_ids" else 0
            padded = values[0].new_full((len(values), longest), fill)
            for row, value in enumerate(values):
                padded[row, :value.shape[1]] = value[0]
            batch[key] = padded
        elif all(torch.is_tensor(v) for v in values):
            batch[key] = torch.cat(values, dim=0)
        else:  # lists (e.g. seconds per video grid) follow record order too
            batch[key] = [item for v in values for item in (v if isinstance(v, (list, tuple)) else [v])]
    return batch


def record_length(features: Features) -> int:
    """Real tokens of one encoded record."""
    return int(features["attention_mask"].sum()) if "attention_mask" in features else features["input_ids"].shape[1]
