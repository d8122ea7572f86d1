"""Freezing by component and LoRA targeting read the registry and do exactly what the config says, for every
family (conftest.FAMILIES); Nemotron's Mamba projections in LoRA's defaults are in tests/test_nemotron.py."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from conftest import FAMILIES, compose
from vlm_sweep.models.registry import COMPONENT_ORDER, component_of, get_family
from vlm_sweep.training.freeze import FLAG_TO_COMPONENT, apply_freeze, trainable_by_component
from vlm_sweep.training.lora import LoraTargetError, apply_lora, select_lora_parameters, select_lora_targets


def _load(model_name: str):
    from vlm_sweep.models.load import load_model_and_processor

    cfg = compose([f"model={model_name}"])
    model, _ = load_model_and_processor(cfg.model)
    return model, get_family(cfg.model.family)


@pytest.fixture(scope="module", params=FAMILIES)
def loaded(request):
    return _load(request.param)


def _freeze_cfg(**flags):
    base = {flag: None for flag in FLAG_TO_COMPONENT}
    return OmegaConf.create({**base, **flags})


def _linears(model, family) -> list:
    """Every nn.Linear but the output head, in module order."""
    return [n for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and component_of(family, n) != "lm_head"]


def test_every_parameter_has_a_component(loaded):
    model, family = loaded
    unclassified = [n for n, _ in model.named_parameters() if component_of(family, n) is None]
    assert unclassified == []
    present = {component_of(family, n) for n, _ in model.named_parameters()}
    head = model.get_submodule(family.components["lm_head"][0])
    tied = head.weight is model.get_input_embeddings().weight  # Gemma ties lm_head to the embeddings
    expected = {"embeddings", "vision_tower", "vision_projection", "language_model"} | (set() if tied else {"lm_head"})
    assert present - {"audio_tower"} == expected  # an audio branch where the model has one (Nemotron Omni's)
    assert ("audio_tower" in present) == bool(_audio_parts(model, family))


def _audio_parts(model, family) -> list:
    """The registry's audio paths that are real submodules of this model (none declared, or absent: [])."""
    return [p for p in family.components["audio_tower"]
            if isinstance(getattr(model.get_submodule(p.rsplit(".", 1)[0]) if "." in p else model,
                                  p.rsplit(".", 1)[-1], None), torch.nn.Module)]


@pytest.mark.parametrize("flag", list(FLAG_TO_COMPONENT))
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
    assert set(trainable_by_component(model, family)) == {component_of(family, n) for n, _ in model.named_parameters()
                                                          } - covered


def test_audio_flag_is_a_registry_lookup(loaded):
    """freeze_audio_tower freezes exactly the audio branch the registry names (Nemotron Omni's Parakeet encoder and
    its projector); a model without one (none declared, or the omni audio branch absent) is untouched."""
    model, family = loaded
    for p in model.parameters():
        p.requires_grad_(True)
    counts = apply_freeze(model, family, _freeze_cfg(freeze_audio_tower=True))
    audio = sum(p.numel() for n, p in model.named_parameters() if component_of(family, n) == "audio_tower")
    assert bool(audio) == bool(_audio_parts(model, family))
    assert counts["total_params"] - counts["trainable_params"] == audio


def test_lora_adapts_only_language_model_linears(loaded):
    model, family = loaded
    cfg = compose(["peft=lora"]).peft
    targets = select_lora_targets(model, family, cfg)
    assert targets and all(component_of(family, t) == "language_model" for t in targets)
    assert not any("lm_head" in t for t in targets)


@pytest.mark.parametrize("peft", ["lora_vision", "lora_all"])
def test_lora_all_adapts_every_linear_but_lm_head(loaded, peft):
    model, family = loaded
    targets = select_lora_targets(model, family, compose([f"peft={peft}"]).peft)
    assert targets == _linears(model, family)
    # Gemma 3's projector is a bare weight matrix (no nn.Linear): LoRA cannot adapt it;
    # train it fully with freeze.freeze_vision_projection=false instead.
    assert {"language_model", "vision_tower"} <= {component_of(family, t) for t in targets}


def test_target_and_exclude_globs(loaded):
    model, family = loaded
    cfg = compose(["peft=lora", "peft.target_modules=[*q_proj,*v_proj]",
                   "peft.exclude_modules=[*layers.0.*]"]).peft
    targets = select_lora_targets(model, family, cfg)
    assert targets and all(t.endswith(("q_proj", "v_proj")) and ".layers.0." not in t for t in targets)
    with pytest.raises(LoraTargetError):
        select_lora_targets(model, family, compose(["peft=lora", "peft.target_modules=[*nothing*]"]).peft)


def _guide_setting(model_name: str, peft: str, freeze: str):
    """(model, family, its linears before LoRA) as training sets it up: the PEFT method with the freeze
    config, then the freeze flags."""
    model, family = _load(model_name)
    cfg = compose([f"model={model_name}", f"peft={peft}", f"freeze={freeze}"])
    # Adapted: the linears, and fused expert weights (MoE LMs) by their module path.
    linears = _linears(model, family) + [n.rsplit(".", 1)[0] for n in select_lora_parameters(model, family, cfg.peft)]
    model = apply_lora(model, family, cfg.peft, cfg.freeze)
    apply_freeze(model, family, cfg.freeze)
    return model, family, linears


def _base_name(name: str) -> str:
    """A parameter's name in the unwrapped model (PEFT's trained copy or kept original of a module, or the
    nested wrappers of an experts module whose fused parameters each carry an adapter)."""
    name = name.split("base_model.model.", 1)[-1]
    return name.replace("modules_to_save.default.", "").replace("original_module.", "").replace(".base_layer", "")


@pytest.mark.parametrize("model_name", FAMILIES)
def test_guide_setting_a_lora_on_lm_vision_and_projection_fully_trained(model_name):
    """Nemotron guide setting (a), peft=lora freeze=lora_lm_train_vision: LoRA on the LM, every weight of the
    vision tower and projector trained fully, nothing else."""
    model, family, _ = _guide_setting(model_name, "lora", "lora_lm_train_vision")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapters = {n for n in trainable if "lora_" in n}
    assert adapters and {component_of(family, n) for n in adapters} == {"language_model"}
    vision = {_base_name(n) for n, _ in model.named_parameters()
              if "lora_" not in n and component_of(family, n) in ("vision_tower", "vision_projection")}
    assert vision and {_base_name(n) for n in trainable - adapters} == vision
    # The log's breakdown shows the adapters and the fully trained vision tower and projector apart.
    by_component = trainable_by_component(model, family)
    assert set(by_component) == {"adapters", "vision_tower", "vision_projection"}
    assert by_component["adapters"] == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert sum(by_component.values()) == sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("model_name", FAMILIES)
def test_guide_setting_b_lora_everywhere_base_frozen(model_name):
    """Nemotron guide setting (b), peft=lora_all freeze=base_frozen: only adapters train, on every linear."""
    model, family, linears = _guide_setting(model_name, "lora_all", "base_frozen")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert {_base_name(n).split(".lora_")[0] for n in trainable} == set(linears)


def test_component_order_is_most_specific_first():
    assert COMPONENT_ORDER.index("vision_projection") < COMPONENT_ORDER.index("vision_tower")
    assert COMPONENT_ORDER.index("embeddings") < COMPONENT_ORDER.index("language_model")
    qwen = get_family("qwen2_5_vl")
    assert component_of(qwen, "base_model.model.model.visual.merger.mlp.0.weight") == "vision_projection"
    assert component_of(qwen, "model.visual.blocks.0.attn.qkv.weight") == "vision_tower"


@pytest.mark.parametrize("overrides,message", [
    (["model=tiny_nemotron_vl", "peft=dora"], r"peft\.method=dora cannot adapt fused expert weights"),
    (["model=tiny_nemotron_vl", "peft=lora_all", "peft.dropout=0.1"], r"takes no dropout in peft"),
    (["model=tiny_gemma3", "peft=lora", "peft.target_modules=[*no_such_module*]"], r"leave no Linear module"),
    (["model=tiny_qwen2_5_vl", "peft=lora_vision", "freeze.freeze_vision_tower=false"], r"freeze trains .* fully"),
], ids=["dora-on-experts", "dropout-on-experts", "no-target", "freeze-clash"])
def test_a_peft_target_error_stops_the_run_before_the_data_and_the_weights_load(overrides, message, tmp_path,
                                                                               monkeypatch):
    """A 12B model takes minutes to load: its targets are resolved on a weightless (meta) copy first."""
    import vlm_sweep.data.datasets as datasets
    import vlm_sweep.models.load as load
    from vlm_sweep.train import run

    def too_late(*args, **kwargs):
        raise AssertionError("data or weights were loaded before the PEFT targets were checked")

    monkeypatch.setattr(datasets, "build_datasets", too_late)
    monkeypatch.setattr(load, "load_model", too_late)
    with pytest.raises(LoraTargetError, match=r"^config error: .*" + message) as info:
        run(compose([*overrides, "tracking=none"]), tmp_path / "run")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("model_name", FAMILIES)
def test_ddp_searches_for_unused_parameters_only_when_a_media_part_trains(model_name):
    """A batch without an image leaves a trainable vision tower/projector without gradients (DDP must search
    for them); LoRA on the language model and full text-path fine-tuning never do (no per-step traversal)."""
    from vlm_sweep.training.distributed import find_unused_parameters

    model, family = _load(model_name)
    for _, param in model.named_parameters():
        param.requires_grad_(False)
    apply_freeze(model, family, _freeze_cfg(freeze_vision_tower=True, freeze_vision_projection=True,
                                            freeze_audio_tower=True, freeze_embeddings=False,
                                            freeze_language_model=False))
    assert not find_unused_parameters(model, family, None)
    assert find_unused_parameters(model, family, True)  # an explicit setting wins
    lora_lm = apply_lora(model, family, compose([f"model={model_name}", "peft=lora"]).peft)
    assert not find_unused_parameters(lora_lm, family, None)
    model, family = _load(model_name)
    lora_vision = apply_lora(model, family, compose([f"model={model_name}", "peft=lora_vision"]).peft)
    assert find_unused_parameters(lora_vision, family, None)
    assert not find_unused_parameters(lora_vision, family, False)
