"""peft=dora trains DoRA, not plain LoRA: LoRA's targets get a magnitude vector each, the vectors
train, and they are saved in the adapter (so generation and export load DoRA, not LoRA)."""

from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES, compose
from vlm_sweep.models.load import load_model_and_processor
from vlm_sweep.models.registry import get_family
from vlm_sweep.training.peft_methods import apply_peft

MAGNITUDE = "lora_magnitude_vector"


def _magnitudes(model) -> dict:
    """{name: magnitude vector}, named as the saved adapter names them (peft's own state dict)."""
    from peft import get_peft_model_state_dict

    return {n: t.detach().clone() for n, t in get_peft_model_state_dict(model).items() if MAGNITUDE in n}


@pytest.mark.parametrize("model_name", FAMILIES)
def test_dora_adapts_lora_targets_with_a_trainable_magnitude_each_for_every_family(model_name):
    """The same modules as peft=lora (fused experts left out: peft has no DoRA for them)."""
    cfg = compose([f"model={model_name}", "peft=dora"])
    model, _ = load_model_and_processor(cfg.model)
    family = get_family(cfg.model.family)
    if family.expert_parameters:
        cfg = compose([f"model={model_name}", "peft=dora", "peft.exclude_modules=[*experts*]"])
    lora = compose([f"model={model_name}", "peft=lora", *(["peft.exclude_modules=[*experts*]"]
                                                        if family.expert_parameters else [])])
    wrapped = apply_peft(model, family, cfg.peft, cfg.freeze)
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in wrapped.named_parameters() if ".lora_A." in n}
    magnitudes = {n.rsplit(f".{MAGNITUDE}", 1)[0] for n, p in wrapped.named_parameters()
                  if MAGNITUDE in n and p.requires_grad}
    assert adapted and magnitudes == adapted
    assert wrapped.peft_config["default"].use_dora
    plain, _ = load_model_and_processor(lora.model)
    plain = apply_peft(plain, family, lora.peft, lora.freeze)
    assert {n.rsplit(".lora_A", 1)[0] for n, _ in plain.named_parameters() if ".lora_A." in n} == adapted


@pytest.mark.slow
def test_a_two_step_dora_run_changes_the_saved_magnitudes(tmp_path):
    from safetensors.torch import load_file

    from vlm_sweep.train import run

    cfg = compose(["peft=dora", "tracking=none", "step_scheduler.max_steps=2", "step_scheduler.ckpt_every_steps=2",
                   "eval=none"])
    model, _ = load_model_and_processor(cfg.model)
    before = _magnitudes(apply_peft(model, get_family(cfg.model.family), cfg.peft, cfg.freeze))
    result = run(cfg, tmp_path)
    assert result.status == "FINISHED" and result.step == 2
    saved = load_file(str(next(tmp_path.rglob("step_2/model/adapter_model.safetensors"))))
    after = {n: t for n, t in saved.items() if MAGNITUDE in n}
    assert set(after) == set(before)
    assert any(not torch.allclose(after[n], before[n]) for n in after)


def test_fused_expert_weights_stop_dora_in_one_line_with_an_override_that_works():
    from omegaconf import OmegaConf

    from vlm_sweep.training.lora import LoraTargetError

    cfg = compose(["model=tiny_nemotron_vl", "peft=dora"])  # its LM has fused experts (no DoRA in peft)
    model, _ = load_model_and_processor(cfg.model)
    family = get_family(cfg.model.family)
    with pytest.raises(LoraTargetError) as err:
        apply_peft(model, family, cfg.peft, cfg.freeze)
    message = str(err.value)
    assert "\n" not in message and "peft.method=dora" in message
    fix = message.split('"')[1]  # peft.exclude_modules=[...,'*experts*']
    fixed = compose(["model=tiny_nemotron_vl", "peft=dora", fix])
    wrapped = apply_peft(model, family, fixed.peft, fixed.freeze)
    assert any(MAGNITUDE in n for n, _ in wrapped.named_parameters())
    assert not any("experts" in n and "lora_" in n for n, _ in wrapped.named_parameters())
    assert OmegaConf.to_container(fixed.peft.exclude_modules)[-1] == "*experts*"
