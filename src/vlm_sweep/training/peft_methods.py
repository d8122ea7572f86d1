"""PEFT methods by name: ``peft.method`` -> the function that applies it.

Adding a method is its apply function (here or in its own module), one row in
``PEFT_METHODS`` and a ``conf/peft/<name>.yaml``; the recipe, the config
validation and the bench read this table and nothing else.
"""

from __future__ import annotations

from typing import Any, Callable, Dict

from vlm_sweep.models.registry import ModelFamily
from vlm_sweep.training.lora import apply_dora, apply_lora

# (model, family, peft config, freeze config) -> the model to train (wrapped or not).
ApplyPeft = Callable[[Any, ModelFamily, Any, Any], Any]


def full_finetuning(model: Any, family: ModelFamily, peft_cfg: Any, freeze_cfg: Any = None) -> Any:
    """No adapters: the freeze config alone decides what trains."""
    return model


PEFT_METHODS: Dict[str, ApplyPeft] = {
    "none": full_finetuning,
    "lora": apply_lora,
    "dora": apply_dora,
}


def apply_peft(model: Any, family: ModelFamily, peft_cfg: Any, freeze_cfg: Any = None) -> Any:
    """Apply ``peft_cfg.method`` (validated against ``PEFT_METHODS`` before any model loads)."""
    return PEFT_METHODS[peft_cfg.method](model, family, peft_cfg, freeze_cfg)
