"""Next-token loss without full-vocabulary logits for every position.

A VLM batch is mostly image, prompt and padding tokens; only the answer carries labels.
Projecting every position onto a 262k-word vocabulary (Gemma 3) and upcasting that to
fp32 costs ~2 GiB per 2k-token sample before the backward. Here the model is asked for
the labelled positions only (transformers' ``logits_to_keep`` with a boolean mask, which
hands the LM head a ``(num_labelled, hidden)`` tensor), and for the duration of the call
the LM head turns those rows into the summed cross-entropy itself: chunk by chunk, each
chunk projected once with its gradients taken at once (``training/linear_ce.py``; a wrapped
head is checkpointed per chunk instead), so no ``(num_labelled, vocab)`` logits tensor ever
exists, in the forward or the backward, and the head's weight is still used inside the
model's forward (DDP and FSDP see it there).
The result equals the sum of per-token cross-entropies over labelled positions (what the
trainer normalises by label tokens).

A model that post-processes its logits after the head (a final logit soft-cap) gets the
labelled logits instead, with the cross-entropy chunked over them.
"""

from __future__ import annotations

import functools
import inspect
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlm_sweep.data.packing import NON_MODEL_KEYS as PACKING_KEYS
from vlm_sweep.data.packing import model_inputs
from vlm_sweep.training.linear_ce import linear_cross_entropy_sum

IGNORE_INDEX = -100
NON_MODEL_KEYS = ("labels", "num_skipped", "record_ids", *PACKING_KEYS)
# fp32 logits of one chunk (its backward holds about three such buffers): 128 rows of Gemma 3's
# 262k vocabulary. The rows per chunk follow from the vocabulary unless given.
CHUNK_BYTES = 128 * 2**20
# Below this many bytes of fp32 logits for all labelled rows, keeping them for the backward costs
# less than recomputing them (a small vocabulary): no chunking, no checkpoint.
SMALL_LOGITS_BYTES = 64 * 2**20
# Config attributes that transform logits after the LM head (the head cannot return a loss then).
LOGIT_POSTPROCESSING_ATTRS = ("final_logit_softcapping",)


def labelled_positions(labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mask over positions whose NEXT token is labelled, those next tokens in row-major order)."""
    following = labels[:, 1:]
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = following != IGNORE_INDEX
    return mask, following[following != IGNORE_INDEX]


def _chunked_sum(rows: torch.Tensor, targets: torch.Tensor, to_logits: Callable[[torch.Tensor], torch.Tensor],
                 chunk_rows: Optional[int], small_logits_bytes: int) -> torch.Tensor:
    """Sum of cross-entropies of ``to_logits(rows)``, one checkpointed chunk of rows at a time."""
    def chunk_loss(part: torch.Tensor, part_targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(to_logits(part).float(), part_targets, reduction="sum")

    vocab = _out_features(to_logits, rows)
    if targets.numel() * vocab * 4 <= small_logits_bytes:
        return chunk_loss(rows, targets)
    chunk_rows = _rows_per_chunk(vocab, chunk_rows)
    total = rows.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), chunk_rows):
        part = slice(start, start + chunk_rows)
        if torch.is_grad_enabled() and rows.requires_grad:
            total = total + checkpoint(chunk_loss, rows[part], targets[part], use_reentrant=False)
        else:
            total = total + chunk_loss(rows[part], targets[part])
    return total


def _rows_per_chunk(vocab: int, chunk_rows: Optional[int]) -> int:
    """``chunk_rows`` if given, else as many rows as fit ``CHUNK_BYTES`` of fp32 logits."""
    return chunk_rows or max(1, CHUNK_BYTES // (vocab * 4))


def _out_features(to_logits: Callable[[torch.Tensor], torch.Tensor], rows: torch.Tensor) -> int:
    """Logits per row: the head's output width (its bound module), or the rows' own width."""
    head = getattr(to_logits, "__self__", None)
    return int(getattr(head, "out_features", 0) or getattr(getattr(head, "weight", None), "shape", [0])[0]
               or rows.shape[-1])


def _unwrap(model: Any) -> Any:
    """The model inside DDP / torch.compile wrappers (PEFT models pass attribute lookups through)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)


def output_head(model: Any) -> Optional[nn.Module]:
    """The LM head whose output is the model's logits; None if they are post-processed after it.

    Looked up on the model, else on its ``language_model`` (a VLM that delegates to a causal LM).
    """
    inner = _unwrap(model)
    config = getattr(inner, "config", None)
    configs = [config, getattr(config, "text_config", None), getattr(config, "llm_config", None)]
    if any(getattr(c, attr, None) is not None for c in configs if c is not None for attr in LOGIT_POSTPROCESSING_ATTRS):
        return None
    for owner in (inner, getattr(inner, "language_model", None)):
        get_head = getattr(owner, "get_output_embeddings", None)
        head = get_head() if callable(get_head) else None
        if isinstance(head, nn.Module):
            return head
    return None


@functools.lru_cache(maxsize=None)
def _forward_takes_logits_to_keep(model_class: type) -> bool:
    """Whether a model class's forward accepts ``logits_to_keep`` (every transformers class does; hub
    remote code may not, e.g. Nemotron Nano V2 VL's forward has a fixed signature)."""
    params = inspect.signature(model_class.forward).parameters.values()
    return any(p.name == "logits_to_keep" or p.kind is p.VAR_KEYWORD for p in params)


@contextmanager
def _head_returns_loss(head: nn.Module, targets: torch.Tensor, chunk_rows: Optional[int],
                       small_logits_bytes: int) -> Iterator[list]:
    """While active, ``head(rows)`` returns the summed loss of those rows (called once per forward)."""
    project = head.forward
    returned: list = []

    def loss_forward(hidden: torch.Tensor) -> torch.Tensor:
        rows = hidden.reshape(-1, hidden.shape[-1])
        if rows.shape[0] != targets.numel():
            raise RuntimeError(f"the LM head got {rows.shape[0]} rows for {targets.numel()} labelled positions; "
                               "the model ignored logits_to_keep")
        if type(head) is nn.Linear:  # each chunk projected once, its gradients taken right away
            returned.append(linear_cross_entropy_sum(rows, head.weight, head.bias, targets,
                                                     _rows_per_chunk(head.out_features, chunk_rows)))
        else:  # a wrapped head (LoRA on it, quantised): its own forward, checkpointed per chunk
            returned.append(_chunked_sum(rows, targets, project, chunk_rows, small_logits_bytes))
        return returned[-1]

    head.forward = loss_forward
    try:
        yield returned
    finally:
        del head.forward  # back to the class's forward


def summed_token_loss(model: Any, batch: Dict[str, Any], chunk_rows: Optional[int] = None,
                      small_logits_bytes: int = SMALL_LOGITS_BYTES) -> torch.Tensor:
    """Sum (not mean) of next-token cross-entropy over labelled positions.

    ``chunk_rows``: rows per checkpointed chunk (None: ``CHUNK_BYTES`` of fp32 logits);
    ``small_logits_bytes``: up to this size the labelled logits are built at once (0: always chunk).
    """
    inputs = model_inputs(batch, NON_MODEL_KEYS)
    mask, targets = labelled_positions(batch["labels"])
    inner = _unwrap(model)
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner  # PEFT's forward takes **kwargs
    if not _forward_takes_logits_to_keep(type(base)):  # every position's logits, then the labelled
        logits = model(**inputs, use_cache=False).logits
        if targets.numel() == 0:
            return logits.sum() * 0.0
        return _chunked_sum(logits[mask], targets, lambda x: x, chunk_rows, small_logits_bytes)
    if targets.numel() == 0:  # nothing to learn here; still run the graph so every rank's backward matches
        logits = model(**inputs, use_cache=False, logits_to_keep=1).logits
        return logits.sum() * 0.0
    head = output_head(model)
    if head is not None and "forward" not in vars(head):
        with _head_returns_loss(head, targets, chunk_rows, small_logits_bytes) as returned:
            out = model(**inputs, use_cache=False, logits_to_keep=mask).logits
        # Not ``out is returned[0]``: DDP hands back its own tensor (the one its backward hooks watch).
        if len(returned) != 1 or out.shape != returned[0].shape:
            raise RuntimeError("the model changed what its LM head returned; cannot use the fused loss")
        return out
    logits = model(**inputs, use_cache=False, logits_to_keep=mask).logits
    if logits.dim() == 3:  # a model that ignores the mask returns every position
        logits = logits[mask]
    return _chunked_sum(logits, targets, lambda x: x, chunk_rows, small_logits_bytes)


def count_label_tokens(batch: Dict[str, Any]) -> int:
    """Tokens that carry loss after the causal shift."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) if "labels" in batch else 0
