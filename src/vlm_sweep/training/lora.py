"""LoRA through the peft library, with targets chosen by glob patterns.

Candidates are the model's ``nn.Linear`` modules and, for mixture-of-experts
families, the fused expert weights the registry names (``expert_parameters``:
3-D parameters no ``nn.Linear`` wraps, adapted through peft's
``target_parameters``). All of them with ``match_all_linear``, otherwise the
language model's (from the registry). ``target_modules`` globs narrow the
candidates, ``exclude_modules`` globs remove some; the survivors are handed to
peft by full name, so what is adapted is exactly what the patterns say.
"""

from __future__ import annotations

import fnmatch
from typing import Any, List

from vlm_sweep.errors import LoraTargetError  # noqa: F401 (defined there, re-exported here)
from vlm_sweep.models.registry import ModelFamily, component_of


def _matches(name: str, patterns: List[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _selected(name: str, family: ModelFamily, peft_cfg: Any) -> bool:
    """Whether a candidate (module or parameter name) passes the component and glob rules."""
    if not peft_cfg.match_all_linear and component_of(family, name) != "language_model":
        return False
    if peft_cfg.target_modules and not _matches(name, list(peft_cfg.target_modules)):
        return False
    return not _matches(name, list(peft_cfg.exclude_modules))


def _linear_targets(model: Any, family: ModelFamily, peft_cfg: Any) -> List[str]:
    import torch

    return [name for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and _selected(name, family, peft_cfg)]


def select_lora_parameters(model: Any, family: ModelFamily, peft_cfg: Any) -> List[str]:
    """Full names of the fused expert parameters that get adapters (empty for families without any)."""
    suffixes = tuple(f".{p}" for p in family.expert_parameters)
    if not suffixes:
        return []
    return [name for name, _ in model.named_parameters()
            if name.endswith(suffixes) and _selected(name, family, peft_cfg)]


def select_lora_targets(model: Any, family: ModelFamily, peft_cfg: Any) -> List[str]:
    """Full names of the Linear modules that get adapters."""
    targets = _linear_targets(model, family, peft_cfg)
    if not targets and not select_lora_parameters(model, family, peft_cfg):
        raise LoraTargetError(
            "config error: peft.target_modules/peft.exclude_modules leave no Linear module to adapt"
        )
    return targets


def fully_trained_modules(family: ModelFamily, freeze_cfg: Any, targets: List[str]) -> List[str]:
    """Module paths of components whose freeze flag is explicitly false: under LoRA their base
    weights train fully, so PEFT must save them with the adapter (``modules_to_save``)."""
    from vlm_sweep.training.freeze import FLAG_TO_COMPONENT

    paths: List[str] = []
    for flag, component in FLAG_TO_COMPONENT.items():
        if freeze_cfg is not None and getattr(freeze_cfg, flag, None) is False:
            paths += [p for p in family.components.get(component, ()) if p not in paths]
    paths = [p for p in paths if not any(p.startswith(q + ".") for q in paths if q != p)]  # outermost only
    for path in paths:
        clash = [t for t in targets if t.startswith(path + ".")]
        if clash:
            raise LoraTargetError(
                f"config error: freeze trains {path} fully but peft also puts LoRA on it ({clash[0]}); "
                f"exclude it from peft.target_modules or freeze it")
    return paths


def lora_config(model: Any, family: ModelFamily, peft_cfg: Any, freeze_cfg: Any = None, **extra: Any) -> Any:
    """The ``peft.LoraConfig`` for the selected modules and expert parameters; ``extra`` are the
    LoraConfig keys a variant adds (DoRA: ``use_dora=True``), so every variant targets alike."""
    from peft import LoraConfig

    targets = select_lora_targets(model, family, peft_cfg)
    parameters = select_lora_parameters(model, family, peft_cfg)
    if parameters and peft_cfg.dropout:
        raise LoraTargetError(
            f"config error: peft.dropout={peft_cfg.dropout} but LoRA on fused expert weights ({parameters[0]}) "
            f"takes no dropout in peft; set peft.dropout=0 or add '*experts*' to peft.exclude_modules")
    return LoraConfig(
        r=peft_cfg.dim,
        lora_alpha=peft_cfg.alpha,
        lora_dropout=peft_cfg.dropout,
        target_modules=targets,
        target_parameters=parameters or None,
        modules_to_save=fully_trained_modules(family, freeze_cfg, targets + parameters) or None,
        bias="none",
        **extra,
    )


def apply_lora(model: Any, family: ModelFamily, peft_cfg: Any, freeze_cfg: Any = None) -> Any:
    """Wrap the model in a PeftModel with LoRA on the selected modules and expert parameters.

    peft gives each targeted expert tensor one low-rank pair per expert (rank ``dim`` each).
    """
    from peft import get_peft_model

    return get_peft_model(model, lora_config(model, family, peft_cfg, freeze_cfg))


def dora_config(model: Any, family: ModelFamily, peft_cfg: Any, freeze_cfg: Any = None) -> Any:
    """LoRA's config with ``use_dora``; peft has no DoRA for fused expert parameters, so a family
    with them must exclude '*experts*' (a one-line LoraTargetError says how)."""
    parameters = select_lora_parameters(model, family, peft_cfg)
    if parameters:
        excluded = ",".join(f"'{p}'" for p in [*peft_cfg.exclude_modules, "*experts*"])
        raise LoraTargetError(
            f"config error: peft.method=dora cannot adapt fused expert weights ({parameters[0]}; peft has no "
            f"DoRA for them): leave them out with \"peft.exclude_modules=[{excluded}]\" or use peft=lora")
    return lora_config(model, family, peft_cfg, freeze_cfg, use_dora=True)


def apply_dora(model: Any, family: ModelFamily, peft_cfg: Any, freeze_cfg: Any = None) -> Any:
    """DoRA (weight-decomposed LoRA, peft's ``use_dora``): LoRA's targets, plus a trained magnitude
    per output row (``lora_magnitude_vector``); often closer to full fine-tuning at LoRA's rank."""
    from peft import get_peft_model

    return get_peft_model(model, dora_config(model, family, peft_cfg, freeze_cfg))
