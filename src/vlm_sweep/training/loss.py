"""Next-token loss without full-vocabulary logits for every position.

A VLM batch is mostly image, prompt and padding tokens; only the answer carries labels.
Projecting every position onto a 262k-word vocabulary (Gemma 3) and upcasting that to
fp32 costs ~2 GiB per 2k-token sample before the backward. Here the model is asked for
logits at the labelled positions only (transformers' ``logits_to_keep`` with a boolean
mask, flattened to ``(num_labelled, vocab)``), and the fp32 cross-entropy runs over
chunks of those rows under activation checkpointing, so at most one fp32 chunk exists
at a time, in the forward and in the backward. The result equals the sum of per-token
cross-entropies over labelled positions (what the trainer normalises by label tokens).
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
NON_MODEL_KEYS = ("labels", "num_skipped", "record_ids")
# Rows of fp32 logits alive at once (x vocab x 4 bytes: 1024 x 262k = 1 GiB at most).
DEFAULT_CHUNK_ROWS = 1024


def labelled_positions(labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mask over positions whose NEXT token is labelled, those next tokens in row-major order)."""
    following = labels[:, 1:]
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = following != IGNORE_INDEX
    return mask, following[following != IGNORE_INDEX]


def _chunk_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def summed_token_loss(model: Any, batch: Dict[str, Any], chunk_rows: int = DEFAULT_CHUNK_ROWS) -> torch.Tensor:
    """Sum (not mean) of next-token cross-entropy over labelled positions."""
    inputs = {k: v for k, v in batch.items() if k not in NON_MODEL_KEYS}
    mask, targets = labelled_positions(batch["labels"])
    if targets.numel() == 0:  # nothing to learn here; still run the graph so every rank's backward matches
        logits = model(**inputs, use_cache=False, logits_to_keep=1).logits
        return logits.sum() * 0.0
    logits = model(**inputs, use_cache=False, logits_to_keep=mask).logits
    if logits.dim() == 3:  # a model that ignores the mask returns every position
        logits = logits[mask]
    total = logits.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), chunk_rows):
        rows = slice(start, start + chunk_rows)
        if torch.is_grad_enabled() and logits.requires_grad:
            total = total + checkpoint(_chunk_loss, logits[rows], targets[rows], use_reentrant=False)
        else:
            total = total + _chunk_loss(logits[rows], targets[rows])
    return total


def count_label_tokens(batch: Dict[str, Any]) -> int:
    """Tokens that carry loss after the causal shift."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) if "labels" in batch else 0
