"""Padding-free packing: several whole conversations per row, each attending only to itself.

What is packed: the records of one micro-batch, as the (seeded, resumable) sampler draws them.
So packing changes the compute layout only: every optimizer step sees exactly the conversations
it would see unpacked, the loss stays "sum of token losses / label tokens of the step", and a
resumed run replays the same plan (the plan is a pure function of the records' encoded lengths).
Inside a micro-batch the records go into rows of at most ``dataset.pack_length`` tokens (image
and video placeholder tokens counted) by first-fit-decreasing, evened out (``plan_rows``);
``pack_length`` null puts the whole micro-batch into one row (no padding at all; memory never
above the unpadded micro-batch's). Raise ``micro_batch_size`` to put more conversations per row. A conversation is never split, so neither is an image.

How the model keeps conversations apart (the standard transformers path; only recurrent layers wrapped):
the packed batch carries ``position_ids`` that restart at 0 for every conversation (and for the
padding closing a row) and NO ``attention_mask`` to the model (the batch's 2-D real-token mask is
bookkeeping; ``model_inputs`` leaves it out). transformers' ``masking_utils`` then finds the
sequences from the position ids (``find_packed_sequence_indices``) and builds a block-diagonal
causal mask for SDPA / eager; with ``attn_implementation=flash_attention_2`` the same position
ids select the varlen kernel (cu_seqlens from the restarts; flash-attn must be installed, and no
mask tensor is built then). Registry data covers what the generic path cannot:

* ``ModelFamily.packed_rope_index``: multi-dimensional rotary positions (mRoPE) are computed per
  conversation by the model's own function, exactly as if each were alone, with the restarting 1-D
  text positions prepended as row 0 (the ``(1 + dims, batch, length)`` layout transformers reads
  for packed input);
* ``ModelFamily.bidirectional_media``: media tokens that attend to each other both ways get
  an explicit per-layer-type block mask under SDPA / eager (transformers' packed-sequence remapping
  would index that overlay by position instead of by token). Padded batches of such a family get
  the same explicit mask (with the padding as its own segment): equal to transformers' own, without
  its per-forward torch.vmap construction;
* ``ModelFamily.packed_recurrent_modules``: layers that carry state along the row (Nemotron's Mamba2
  mixers) get ``seq_idx`` and run per conversation (``data/packed_recurrence.py`` says how);
* ``ModelFamily.packing_refused``: families that cannot be made exact are refused by the config check.

Validation batches are packed the same way; ``Trainer`` applies ``PackedInputs`` to every batch.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, List, Optional, Sequence, Set

import torch

from vlm_sweep.data import packed_recurrence
from vlm_sweep.data.features import Features
# Batch keys of a packed batch that are bookkeeping, not model inputs.
PACK_LAYOUT = "pack_layout"  # per row: [(length, {media key: rows of it}), ...] in row order
IGNORE_INDEX = -100  # unlabelled (as in data/collate.py, which imports this module)
PACK_ORDER = "pack_order"  # record indices in packed (row-major) order
PREPARED = "packed_inputs_ready"  # set by PackedInputs: the family's positions / masks are in place
NON_MODEL_KEYS = (PACK_LAYOUT, PACK_ORDER, PREPARED)


def plan_rows(lengths: Sequence[int], pack_length: Optional[int]) -> List[List[int]]:
    """Indices into ``lengths`` grouped into rows of at most ``pack_length`` tokens.

    First-fit-decreasing gives the fewest rows; the records are then spread over that many rows
    longest-first onto the shortest row, which evens the rows out (a micro-batch is padded to its
    longest row) whenever that still fits the budget. Deterministic: ties keep index order, rows
    the order they were opened in, records in a row their original order. ``pack_length`` None:
    everything in one row. A record longer than ``pack_length`` is a ValueError naming its index.
    """
    if pack_length is None:
        return [list(range(len(lengths)))] if len(lengths) else []
    decreasing = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: List[List[int]] = []
    room: List[int] = []
    for index in decreasing:
        if lengths[index] > pack_length:
            raise ValueError(f"record {index}: {lengths[index]} tokens exceed pack_length={pack_length}")
        row = next((r for r, free in enumerate(room) if free >= lengths[index]), None)
        if row is None:
            rows.append([])
            room.append(pack_length)
            row = len(rows) - 1
        rows[row].append(index)
        room[row] -= lengths[index]
    balanced: List[List[int]] = [[] for _ in rows]
    totals = [0] * len(rows)
    for index in decreasing:
        row = min(range(len(rows)), key=lambda r: (totals[r], r))
        balanced[row].append(index)
        totals[row] += lengths[index]
    return [sorted(r) for r in (balanced if max(totals, default=0) <= pack_length else rows)]


def planned_positions(lengths: Sequence[int], rows: Sequence[Sequence[int]]) -> int:
    """Positions one packed micro-batch runs (every row padded to the longest)."""
    return len(rows) * max((sum(lengths[i] for i in row) for row in rows), default=0)


def plan_efficiency(lengths: Sequence[int], rows: Sequence[Sequence[int]]) -> float:
    """Real tokens / processed tokens of one packed micro-batch."""
    processed = planned_positions(lengths, rows)
    return sum(lengths[i] for row in rows for i in row) / processed if processed else 1.0


def _is_sequence(value: Any, length: int) -> bool:
    return torch.is_tensor(value) and value.dim() == 2 and value.shape == (1, length)


def _media_count(value: Any) -> int:
    return int(value.shape[0]) if torch.is_tensor(value) else len(value) if isinstance(value, (list, tuple)) else 1


def pack_records(records: Sequence[Features], labels: Sequence[torch.Tensor], pack_length: Optional[int],
                 pad_token_id: int) -> Dict[str, Any]:
    """A packed batch from per-record features (each encoded alone) and their label rows.

    Sequence tensors (ids, token types, labels) are concatenated per row and right-padded to the
    longest row; ``position_ids`` restart at 0 per record and for the padding; media tensors are
    concatenated in row-major record order, i.e. the order of their placeholder tokens.
    """
    lengths = [int(r["input_ids"].shape[1]) for r in records]
    rows = plan_rows(lengths, pack_length)
    order = [i for row in rows for i in row]
    longest = max(sum(lengths[i] for i in row) for row in rows)
    seq_keys = [k for k in records[0] if k != "attention_mask"
                and all(_is_sequence(r.get(k), n) for r, n in zip(records, lengths))]
    batch: Dict[str, Any] = {}
    for key in seq_keys + ["labels", "position_ids"]:
        fill = pad_token_id if key == "input_ids" else IGNORE_INDEX if key == "labels" else 0
        out = torch.full((len(rows), longest), fill, dtype=torch.long if key in ("labels", "position_ids")
                         else records[0][key].dtype)
        for r, row in enumerate(rows):
            at = 0
            for i in row:
                if key == "labels":
                    value = labels[i]
                elif key == "position_ids":
                    value = torch.arange(lengths[i])
                else:
                    value = records[i][key][0]
                out[r, at:at + lengths[i]] = value
                at += lengths[i]
            if key == "position_ids":
                out[r, at:] = torch.arange(longest - at)  # the padding is a sequence of its own
        batch[key] = out
    media_keys = [k for k in dict.fromkeys(k for r in records for k in r) if k not in seq_keys and k != "attention_mask"]
    for key in media_keys:
        values = [records[i][key] for i in order if key in records[i]]
        if all(torch.is_tensor(v) for v in values):
            batch[key] = torch.cat(values, dim=0)
        else:
            batch[key] = [item for v in values for item in (v if isinstance(v, (list, tuple)) else [v])]
    # Real tokens (bookkeeping: token counts, pre-flight); ``model_inputs`` never hands it to the model.
    batch["attention_mask"] = (torch.arange(longest)[None] < torch.tensor(
        [sum(lengths[i] for i in row) for row in rows])[:, None]).long()
    batch[PACK_LAYOUT] = [[(lengths[i], {k: _media_count(records[i][k]) for k in media_keys if k in records[i]})
                           for i in row] for row in rows]
    batch[PACK_ORDER] = order
    return batch


def model_inputs(batch: Dict[str, Any], non_model_keys: Sequence[str]) -> Dict[str, Any]:
    """The keyword arguments of the model's forward. A packed batch's 2-D real-token mask stays out:
    given one, transformers would treat the row as ONE sequence (no packed-sequence detection)."""
    packed = PACK_LAYOUT in batch
    if packed and not batch.get(PREPARED):
        raise ValueError("a packed batch must go through PackedInputs before the model (its family may need "
                         "per-conversation rotary positions or masks)")
    return {k: v for k, v in batch.items() if k not in non_model_keys
            and not (packed and k == "attention_mask" and torch.is_tensor(v))}


def real_tokens(batch: Dict[str, Any]) -> int:
    """Non-padding tokens of a batch, packed or not."""
    return int(batch["attention_mask"].sum()) if "attention_mask" in batch else 0


def processed_tokens(batch: Dict[str, Any]) -> int:
    """Positions the model runs on (padding included)."""
    return int(batch["input_ids"].numel()) if "input_ids" in batch else 0


def _unwrap(model: Any) -> Any:
    """The transformers model inside DDP / compile / PEFT wrappers."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    model = getattr(model, "_orig_mod", model)
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _resolve(model: Any, dotted: str) -> Optional[Callable[..., Any]]:
    """``dotted`` on the transformers model; None if absent."""
    target: Any = model
    for name in dotted.split("."):
        target = getattr(target, name, None)
        if target is None:
            return None
    return target if callable(target) else None


class PackedInputs:
    """What a training batch needs beyond restarting 1-D positions, by family data.

    ``ModelFamily.packed_rope_index``: multi-dimensional rotary positions per conversation (packed).
    ``ModelFamily.bidirectional_media``: an explicit per-layer-type mask (SDPA / eager / flex), packed
    (transformers remaps such a family's media overlay by position ids when it detects packing) or
    padded (transformers builds the same mask with torch.vmap on every forward).
    ``ModelFamily.packed_recurrent_modules``: ``seq_idx``, and those modules wrapped to honour it (at the
    first packed batch: a run that never packs leaves the model untouched).
    """

    def __init__(self, model: Any, family: Any) -> None:
        inner = _unwrap(model)
        rope_index = getattr(family, "packed_rope_index", None)
        self.fn = _resolve(inner, rope_index) if rope_index else None
        if rope_index and self.fn is None:
            raise ValueError(f"the model has no {rope_index} (ModelFamily.packed_rope_index)")
        self.params = set(inspect.signature(self.fn).parameters) if self.fn is not None else set()
        self.media_key = getattr(family, "bidirectional_media", None)
        config = getattr(inner, "config", None)
        self.text_config = config.get_text_config() if config is not None else None
        self.dtype = next((p.dtype for p in inner.parameters() if p.is_floating_point()), torch.float32) \
            if isinstance(inner, torch.nn.Module) else torch.float32
        self.recurrent = dict(getattr(family, "packed_recurrent_modules", None) or {})
        self.model = inner if self.recurrent else None

    def _wrap_recurrent(self) -> None:
        """Wrap the family's recurrent modules once; naming none that the model has is an error."""
        if self.model is not None:
            if not packed_recurrence.install(self.model, self.recurrent):
                raise ValueError(f"the model has no {sorted(self.recurrent)} (ModelFamily.packed_recurrent_modules)")
            self.model = None

    def __call__(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        """The batch with per-conversation rope positions / masks where the family needs them."""
        if PACK_LAYOUT not in batch:
            return self._padded(batch)
        out = {**batch, PREPARED: True}
        if self.media_key and self.media_key in batch and self.text_config is not None:
            masks = block_masks(batch["position_ids"], batch[self.media_key], self.text_config, self.dtype)
            if masks is not None:
                out["attention_mask"] = masks
        if self.fn is not None:
            out["position_ids"] = self._rope_positions(batch)
        if self.recurrent:
            self._wrap_recurrent()
            out[packed_recurrence.SEQ_IDX] = packed_recurrence.sequence_index(
                batch[PACK_LAYOUT], batch["input_ids"].shape[1], batch["input_ids"].device)
        return out

    def _padded(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        """A padded batch of a media-overlay family with its masks built directly (the padding of a row is
        a segment of its own, so it neither attends to nor is attended by the conversation)."""
        real = batch.get("attention_mask")
        if not (self.media_key and self.media_key in batch and self.text_config is not None
                and torch.is_tensor(real) and real.dim() == 2):
            return batch
        real = real.long()
        positions = torch.where(real.bool(), real.cumsum(-1) - 1, (1 - real).cumsum(-1) - 1)
        masks = block_masks(positions, batch[self.media_key], self.text_config, self.dtype)
        return batch if masks is None else {**batch, "attention_mask": masks}

    def _rope_positions(self, batch: Dict[str, Any]) -> torch.Tensor:
        """(1 + dims, rows, length): the 1-D text positions, then each conversation's own rope ids."""
        text = batch["position_ids"]
        rows = []
        offsets: Dict[str, int] = {}
        media = {k for layout in batch[PACK_LAYOUT] for _, row_counts in layout for k in row_counts}
        for r, layout in enumerate(batch[PACK_LAYOUT]):
            at, parts = 0, []
            for length, counts in layout:
                parts.append(self._one(batch, r, at, length, counts, offsets, media))
                at += length
            if at < text.shape[1]:  # padding: plain positions in every dimension
                parts.append(text[r, at:].to(parts[0].dtype).expand(parts[0].shape[0], -1))
            rows.append(torch.cat(parts, dim=1))
        rope = torch.stack(rows, dim=1).to(text.device)
        return torch.cat([text[None].to(rope.dtype), rope], dim=0)

    def _one(self, batch: Dict[str, Any], row: int, at: int, length: int, counts: Dict[str, int],
             offsets: Dict[str, int], media: Set[str]) -> torch.Tensor:
        """One conversation's (dims, length) positions, computed as if it were alone; ``media``: the keys the
        pack layout counts per conversation (never sliced as token sequences)."""
        kwargs: Dict[str, Any] = {}
        for key, value in batch.items():
            if key not in self.params or key == "position_ids":
                continue
            if key in counts:
                start = offsets.get(key, 0)
                kwargs[key] = value[start:start + counts[key]]
            elif key not in media and torch.is_tensor(value) and value.dim() == 2:  # a sequence (ids, token types)
                kwargs[key] = value[row:row + 1, at:at + length]
        for key, count in counts.items():
            offsets[key] = offsets.get(key, 0) + count
        if "attention_mask" in self.params:
            kwargs["attention_mask"] = torch.ones((1, length), dtype=torch.long, device=batch["input_ids"].device)
        positions, _ = self.fn(**kwargs)  # media this conversation lacks stay at their default (None)
        return positions[:, 0]


def block_masks(position_ids: torch.Tensor, media: torch.Tensor, config: Any,
                dtype: torch.dtype = torch.float32) -> Optional[Dict[str, Any]]:
    """{layer type: mask} for SDPA / eager / flex: causal within each conversation, media runs (``media == 1``)
    bidirectional within themselves, sliding layers limited to ``config.sliding_window``. None for
    FlashAttention (it reads the packed sequences off the position ids)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    impl = getattr(config, "_attn_implementation", None) or "sdpa"
    if impl not in ("sdpa", "eager", "flex_attention"):
        return None
    segment = (position_ids == 0).long().cumsum(-1)
    is_media = media == 1
    starts = is_media & ~torch.nn.functional.pad(is_media, (1, 0))[:, :-1]
    block = torch.where(is_media, starts.long().cumsum(-1), -1)
    q, k = segment[:, :, None], segment[:, None, :]
    same_block = (block[:, :, None] == block[:, None, :]) & (block[:, :, None] >= 0)
    index = torch.arange(position_ids.shape[1], device=position_ids.device)
    causal = index[None, :, None] >= index[None, None, :]
    allowed = (q == k) & (causal | same_block)
    window = getattr(config, "sliding_window", None)
    masks = {}
    for layer_type in set(getattr(config, "layer_types", None) or ["full_attention"]):
        layer_allowed = allowed
        if layer_type == "sliding_attention" and window:
            layer_allowed = allowed & (index[None, None, :] > index[None, :, None] - window)
        masks[layer_type] = ALL_MASK_ATTENTION_FUNCTIONS[impl](
            batch_size=position_ids.shape[0], q_length=position_ids.shape[1], kv_length=position_ids.shape[1],
            mask_function=lambda b, h, qi, ki, m=layer_allowed: m[b, qi, ki], attention_mask=None,
            allow_is_causal_skip=False, device=position_ids.device, dtype=dtype, config=config)
    return masks
