"""Freezing by component and LoRA targeting read the registry and do exactly what the config says."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from conftest import compose
from vlm_sweep.models.registry import COMPONENT_ORDER, component_of, get_family
from vlm_sweep.training.freeze import FLAG_TO_COMPONENT, apply_freeze, trainable_by_component
from vlm_sweep.training.lora import LoraTargetError, apply_lora, select_lora_targets


def _load(model_name: str):
    from vlm_sweep.models.load import load_model_and_processor

    cfg = compose([f"model={model_name}"])
    model, _ = load_model_and_processor(cfg.model)
    return model, get_family(cfg.model.family)


@pytest.fixture(scope="module", params=["tiny_gemma3", "tiny_qwen2_5_vl"])
def loaded(request):
    return _load(request.param)


def _freeze_cfg(**flags):
    base = {flag: None for flag in FLAG_TO_COMPONENT}
    return OmegaConf.create({**base, **flags})


def test_every_parameter_has_a_component(loaded):
    model, family = loaded
    unclassified = [n for n, _ in model.named_parameters() if component_of(family, n) is None]
    assert unclassified == []
    present = {component_of(family, n) for n, _ in model.named_parameters()}
    assert {"embeddings", "vision_tower", "vision_projection", "language_model"} <= present


@pytest.mark.parametrize("flag", [f for f in FLAG_TO_COMPONENT if f != "freeze_audio_tower"])
def test_each_freeze_flag_freezes_exactly_its_component(loaded, flag):
    model, family = loaded
    for p in model.parameters():
        p.requires_grad_(True)
    apply_freeze(model, family, _freeze_cfg(**{flag: True}))
    frozen_component = FLAG_TO_COMPONENT[flag]
    # The LM-wide flag also covers embeddings and lm_head (they are part of the LM).
    covered = {frozen_component} | ({"embeddings", "lm_head"} if frozen_component == "language_model" else set())
    for name, param in model.named_parameters():
        component = component_of(family, name)
        assert param.requires_grad == (component not in covered), (flag, name)


def test_audio_flag_is_a_registry_lookup(loaded):
    """Families without an audio tower declare none: the flag changes nothing for them."""
    model, family = loaded
    assert family.components["audio_tower"] == ()
    for p in model.parameters():
        p.requires_grad_(True)
    counts = apply_freeze(model, family, _freeze_cfg(freeze_audio_tower=True))
    assert counts["trainable_params"] == counts["total_params"]


def test_lora_adapts_only_language_model_linears(loaded):
    model, family = loaded
    cfg = compose(["peft=lora"]).peft
    targets = select_lora_targets(model, family, cfg)
    assert targets and all(component_of(family, t) == "language_model" for t in targets)
    assert not any("lm_head" in t for t in targets)


def test_lora_vision_also_adapts_vision_tower_and_projector(loaded):
    import torch

    model, family = loaded
    targets = select_lora_targets(model, family, compose(["peft=lora_vision"]).peft)
    components = {component_of(family, t) for t in targets}
    linear_components = {component_of(family, n) for n, m in model.named_modules()
                         if isinstance(m, torch.nn.Linear)}
    # Gemma 3's projector is a bare weight matrix (no nn.Linear): LoRA cannot adapt it;
    # train it fully with freeze.freeze_vision_projection=false instead.
    assert linear_components - {"lm_head"} == components
    assert {"language_model", "vision_tower"} <= components


def test_target_and_exclude_globs(loaded):
    model, family = loaded
    cfg = compose(["peft=lora", "peft.target_modules=[*q_proj,*v_proj]",
                   "peft.exclude_modules=[*layers.0.*]"]).peft
    targets = select_lora_targets(model, family, cfg)
    assert targets and all(t.endswith(("q_proj", "v_proj")) and ".layers.0." not in t for t in targets)
    with pytest.raises(LoraTargetError):
        select_lora_targets(model, family, compose(["peft=lora", "peft.target_modules=[*nothing*]"]).peft)


def test_lora_then_freeze_false_trains_that_component_fully():
    """Nemotron guide setting (a): LoRA on the LM, vision tower and projector fully trained."""
    model, family = _load("tiny_gemma3")
    peft_model = apply_lora(model, family, compose(["peft=lora"]).peft)
    apply_freeze(peft_model, family, _freeze_cfg(freeze_vision_tower=False, freeze_vision_projection=False,
                                                 freeze_language_model=True))
    by_component = trainable_by_component(peft_model, family)
    assert set(by_component) == {"adapters", "vision_tower", "vision_projection"}
    adapted = {component_of(family, n) for n, _ in peft_model.named_parameters() if "lora_" in n}
    assert adapted == {"language_model"}


def test_component_order_is_most_specific_first():
    assert COMPONENT_ORDER.index("vision_projection") < COMPONENT_ORDER.index("vision_tower")
    assert COMPONENT_ORDER.index("embeddings") < COMPONENT_ORDER.index("language_model")
    qwen = get_family("qwen2_5_vl")
    assert component_of(qwen, "base_model.model.model.visual.merger.mlp.0.weight") == "vision_projection"
    assert component_of(qwen, "model.visual.blocks.0.attn.qkv.weight") == "vision_tower"
