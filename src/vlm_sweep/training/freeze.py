"""Freeze base weights by component, reading the model registry.

A flag set to true freezes that component; false makes its base weights
trainable even under LoRA (fully training, say, the vision tower next to LM
adapters); null keeps the method's default (trainable for full fine-tuning,
frozen under LoRA, where PEFT has already frozen every base weight).
"""

from __future__ import annotations

import logging
import re
from typing import Any, Dict

from vlm_sweep.models.registry import ModelFamily, component_of

log = logging.getLogger(__name__)

FLAG_TO_COMPONENT = {
    "freeze_embeddings": "embeddings",
    "freeze_vision_tower": "vision_tower",
    "freeze_vision_model": "vision_tower",  # Megatron Bridge's name
    "freeze_audio_tower": "audio_tower",
    "freeze_vision_projection": "vision_projection",
    "freeze_language_model": "language_model",
}


_PEFT_WRAPPER = re.compile(r"\.(modules_to_save\.[^.]+|original_module)\.")


def _is_adapter(name: str) -> bool:
    """LoRA weights and PEFT's trained copies (modules_to_save) or kept originals (original_module):
    PEFT already decided whether they train."""
    return "lora_" in name or "modules_to_save" in name or "original_module" in name


def apply_freeze(model: Any, family: ModelFamily, freeze_cfg: Any) -> Dict[str, int]:
    """Set requires_grad per component; returns trainable/total parameter counts.

    The LM-wide flag does not override the more specific embeddings flag: a
    parameter belongs to exactly one component (see registry.COMPONENT_ORDER).
    """
    decisions = {
        component: getattr(freeze_cfg, flag, None)
        for flag, component in FLAG_TO_COMPONENT.items()
        if getattr(freeze_cfg, flag, None) is not None
    }
    # Embeddings and lm_head are part of the language model for the LM-wide flag
    # unless they have a flag of their own.
    lm_flag = decisions.get("language_model")
    if lm_flag is not None:
        decisions.setdefault("embeddings", lm_flag)
        decisions.setdefault("lm_head", lm_flag)
    for name, param in model.named_parameters():
        if _is_adapter(name):
            continue
        frozen = decisions.get(component_of(family, name))
        if frozen is not None:
            param.requires_grad_(not frozen)
    return count_parameters(model)


def count_parameters(model: Any) -> Dict[str, int]:
    """Trainable and total parameter counts (tied weights counted once)."""
    seen, trainable, total = set(), 0, 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    return {"trainable_params": trainable, "total_params": total}


def trainable_by_component(model: Any, family: ModelFamily) -> Dict[str, int]:
    """Trainable parameter count per component ("adapters" for LoRA weights; PEFT's fully trained
    copies, ``modules_to_save``, count under their own component), for logs and tests."""
    counts: Dict[str, int] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        base = _PEFT_WRAPPER.sub(".", name)  # a trained copy's path as the original module's
        key = "adapters" if "lora_" in name else (component_of(family, base) or "other")
        counts[key] = counts.get(key, 0) + param.numel()
    return counts
