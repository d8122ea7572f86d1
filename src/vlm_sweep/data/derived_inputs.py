"""Model inputs a forward needs that its processor does not return, derived per encoded record.

Some hub models ship a processor and a forward that disagree: Nemotron Nano V2 VL's remote processor
returns ``pixel_values`` tiles and ``num_patches``, while its forward takes ``pixel_values`` and
``image_flags`` (and no ``num_patches``). A family says what to derive, as data, in the model registry
(``ModelFamily.derived_inputs``: batch key -> rule name here; ``ModelFamily.dropped_inputs``: processor
outputs its forward does not take); this module holds the rules and applies them.

Hook: the collator calls ``derive_inputs`` on each record right after the processor encodes it, before
the record is measured, cached and merged (``VLMCollator._features``), so every batch, cached or not,
carries the derived inputs and ``merge_features`` concatenates them like any other media tensor.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch

from vlm_sweep.models.registry import MODEL_FAMILIES, ModelFamily

Features = Dict[str, torch.Tensor]
Rule = Callable[[Features, Any], Features]


def _image_token_id(processor: Any) -> int:
    """The id the forward scatters vision features into (the remote processor's ``image_token_id``)."""
    token_id = getattr(processor, "image_token_id", None)
    if token_id is None:
        token_id = processor.tokenizer.convert_tokens_to_ids(getattr(processor, "image_token", "<image>"))
    return int(token_id)


def _tiles_in_bfloat16(features: Features, processor: Any) -> Features:
    """Video frames become image tiles (the forward takes ``pixel_values`` only), all tiles bf16.

    The remote processor returns a video's frames as ``pixel_values_videos`` (one 512x512 tile per frame)
    and marks them with ``<video>`` context tokens; the forward fills only image-context positions from
    ``pixel_values``. As Megatron Bridge's Nano V2 VL collate does, frames are handed over as tiles and
    their context tokens as image-context tokens. A record with both images and a video is refused: the
    order of its tiles against its context tokens would be a guess. The remote ``extract_feature`` casts
    the vision features and projector output to bf16 unconditionally, so its ViT runs in bf16 and takes
    bf16 tiles (NeMo Automodel's and Megatron Bridge's collates cast the same way).
    """
    out = dict(features)
    frames = out.pop("pixel_values_videos", None)
    if frames is not None:
        if out.get("pixel_values") is not None:
            raise ValueError("a record with both images and a video: this model takes them as one run of "
                             "tiles, and their order against the context tokens is unknown")
        video_id = processor.tokenizer.convert_tokens_to_ids(getattr(processor, "video_token", "<video>"))
        ids = out["input_ids"]
        out["input_ids"] = torch.where(ids == video_id, torch.full_like(ids, _image_token_id(processor)), ids)
        out["pixel_values"] = frames
    if out.get("pixel_values") is not None:
        out["pixel_values"] = out["pixel_values"].to(torch.bfloat16)
    return out


def _ones_per_tile(features: Features, processor: Any) -> Features:
    """``image_flags`` (tiles, 1), 1 for every real tile; a record without media gets one zero tile flagged 0.

    The forward dereferences ``image_flags`` and runs the vision model on ``pixel_values`` for every batch
    (InternVL's convention, which it follows: text-only samples carry a dummy tile that ``image_flags == 0``
    drops). Every flagged tile must fill exactly ``num_image_token`` context tokens: the forward only warns
    and fills a prefix when the counts disagree, which would train on misplaced features.
    """
    out = dict(features)
    tiles = out.get("pixel_values")
    if "image_flags" not in out and tiles is None:
        size = int(processor.image_processor.image_size)
        out["pixel_values"] = torch.zeros(1, 3, size, size, dtype=torch.bfloat16)
        out["image_flags"] = torch.zeros(1, 1, dtype=torch.long)
    elif "image_flags" not in out:  # (already derived: applying the rules twice changes nothing)
        out["image_flags"] = torch.ones(tiles.shape[0], 1, dtype=torch.long)
    per_tile = int(processor.num_image_token)
    expected = int(out["image_flags"].sum()) * per_tile
    found = int((out["input_ids"] == _image_token_id(processor)).sum())
    if found != expected:
        raise ValueError(f"{found} image context tokens for {int(out['image_flags'].sum())} tiles of {per_tile} "
                         f"tokens each ({expected}): the processor's expansion and its tiles disagree")
    return out


# Rule name (ModelFamily.derived_inputs values) -> rule. Rules run in the order the family lists them.
RULES: Dict[str, Rule] = {
    "tiles_in_bfloat16": _tiles_in_bfloat16,
    "ones_per_tile": _ones_per_tile,
}


def family_of_processor(processor: Any) -> Optional[ModelFamily]:
    """The registry family whose processor class this processor is (None: no family claims it)."""
    name = type(processor).__name__
    return next((f for f in MODEL_FAMILIES.values() if f.processor_class == name), None)


def derive_inputs(features: Features, processor: Any, family: Optional[ModelFamily] = None) -> Features:
    """One encoded record with its family's derived inputs added and undeliverable outputs dropped.

    ``family``: default, the family whose ``processor_class`` the processor is. Families without
    ``derived_inputs``/``dropped_inputs`` get ``features`` back unchanged. Raises ValueError when a record
    cannot be made into what the forward takes (the collator names the record).
    """
    family = family if family is not None else family_of_processor(processor)
    if family is None or not (family.derived_inputs or family.dropped_inputs):
        return features
    out = dict(features)
    for key, rule in family.derived_inputs.items():
        if rule not in RULES:
            raise KeyError(f"derived input {key!r}: unknown rule {rule!r}; known: {sorted(RULES)}")
        out = RULES[rule](out, processor)
    for key in family.dropped_inputs:
        out.pop(key, None)
    return out
