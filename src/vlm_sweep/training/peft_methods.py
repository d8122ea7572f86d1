"""PEFT methods by name: ``peft.method`` -> the function that applies it.

Adding a method is its apply function (here or in its own module), one row in
``PEFT_METHODS``, its config builder in ``PEFT_CONFIGS`` (what ``check_peft`` runs on a
weightless model before data and weights load) and a ``conf/peft/<name>.yaml``; the recipe,
the config validation and the bench read these tables and nothing else.
"""

from __future__ import annotations

from typing import Any, Callable, Dict

from vlm_sweep.models.registry import ModelFamily
from vlm_sweep.training.lora import apply_dora, apply_lora, dora_config, lora_config

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


# (model, family, peft config, freeze config) -> the method's peft config, or a one-line LoraTargetError
# (no target left, dropout or DoRA on fused experts, a fully trained component that also gets adapters).
PEFT_CONFIGS: Dict[str, Callable[[Any, ModelFamily, Any, Any], Any]] = {
    "lora": lora_config,
    "dora": dora_config,
}


def check_peft(source: str, model_cfg: Any, family: ModelFamily, peft_cfg: Any, freeze_cfg: Any = None) -> None:
    """Resolve the method's targets on a weightless copy of the model (``models.load.weightless_model``,
    built only for a method with targets), so a target error stops the run before the data and the
    weights load, not minutes later."""
    from vlm_sweep.models.load import weightless_model

    build = PEFT_CONFIGS.get(peft_cfg.method)
    skeleton = weightless_model(source, model_cfg) if build is not None else None
    if skeleton is not None:
        build(skeleton, family, peft_cfg, freeze_cfg)


def apply_peft(model: Any, family: ModelFamily, peft_cfg: Any, freeze_cfg: Any = None) -> Any:
    """Apply ``peft_cfg.method`` (validated against ``PEFT_METHODS`` before any model loads)."""
    return PEFT_METHODS[peft_cfg.method](model, family, peft_cfg, freeze_cfg)
