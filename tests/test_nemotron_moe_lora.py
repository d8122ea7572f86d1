"""Nemotron 3 Nano Omni's mixture-of-experts LM and audio branch, on the tiny stand-in (``model=tiny_nemotron_vl``).

``python launch.py model=tiny_nemotron_vl peft=lora_all`` must put LoRA on attention q/k/v/o, the Mamba mixers'
in_proj/out_proj and the routed experts, whose weights are fused 3-D parameters (no ``nn.Linear``: peft adapts them
through ``target_parameters``, named by the registry's ``expert_parameters``), and those adapters must train.
``freeze_audio_tower`` must freeze the Parakeet audio encoder and its projector, which audio really flows through.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import compose
from vlm_sweep.errors import LoraTargetError
from vlm_sweep.models.load import load_model, load_model_and_processor, resolve_source
from vlm_sweep.models.registry import component_of, get_family
from vlm_sweep.train import run
from vlm_sweep.training.freeze import apply_freeze
from vlm_sweep.training.lora import select_lora_parameters
from vlm_sweep.training.peft_methods import apply_peft

FAMILY = get_family("nemotron_vl")
# Where each kind of adapter sits, by the module it wraps (tiny LM: Mamba2, MLP, attention, MoE).
GROUPS = {
    "attention": (".mixer.q_proj", ".mixer.k_proj", ".mixer.v_proj", ".mixer.o_proj"),
    "mamba": (".mixer.in_proj", ".mixer.out_proj"),
    "experts": (".mixer.experts.up_proj", ".mixer.experts.down_proj"),
}


@pytest.fixture(autouse=True)
def single_thread():
    threads, _ = torch.get_num_threads(), torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _built(overrides: list[str]):
    """(model, processor, cfg) set up as training sets it up (train._build): load, PEFT, then freeze flags."""
    cfg = compose(["model=tiny_nemotron_vl", *overrides])
    model, processor = load_model_and_processor(cfg.model)
    model = apply_peft(model, FAMILY, cfg.peft, cfg.freeze)
    apply_freeze(model, FAMILY, cfg.freeze)
    return model, processor, cfg


def _adapted(model) -> dict[str, str]:
    """What each LoRA layer adapts (``...layers.2.mixer.q_proj``, ``...layers.3.mixer.experts.up_proj``) -> the
    layer's module name in the PeftModel; a parameter-targeting wrapper names its parameter."""
    from peft.tuners.lora import LoraLayer

    adapted = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and module.lora_A:
            parameter = getattr(module, "parameter_name", None)
            what = name.replace(".base_layer", "")  # nested wrappers: one per fused parameter of the experts module
            adapted[f"{what}.{parameter}" if parameter else what] = name
    return adapted


def _group(target: str) -> str | None:
    return next((g for g, ends in GROUPS.items() if target.endswith(ends)), None)


def test_lora_all_adapts_attention_mamba_and_every_expert_tensor():
    model, _, cfg = _built(["peft=lora_all"])
    adapted = _adapted(model)
    layers = model.base_model.model.language_model.model.layers
    per_layer = {i: type(layer.mixer).__name__ for i, layer in enumerate(layers)}
    expected = set()
    for i, mixer in per_layer.items():
        prefix = f"base_model.model.language_model.model.layers.{i}"
        ends = {"NemotronHAttention": GROUPS["attention"], "NemotronHMamba2Mixer": GROUPS["mamba"],
                "NemotronHMoE": GROUPS["experts"]}.get(mixer, ())
        expected |= {prefix + end for end in ends}
    assert {"NemotronHAttention", "NemotronHMamba2Mixer", "NemotronHMoE"} <= set(per_layer.values())
    assert expected and expected <= set(adapted), sorted(expected - set(adapted))
    # The expert adapters are peft's parameter wrappers: one rank-`dim` pair per routed expert, trainable.
    n_experts = model.config.text_config.n_routed_experts
    for target in (t for t in adapted if _group(t) == "experts"):
        layer = model.get_submodule(adapted[target])
        assert layer.num_experts == n_experts > 1
        assert layer.lora_A["default"].weight.shape[0] == cfg.peft.dim * n_experts
        assert layer.lora_A["default"].weight.requires_grad and layer.lora_B["default"].weight.requires_grad
    # Base weights stay frozen under LoRA, the fused expert tensors included.
    experts = next(layer.mixer.experts for layer in layers if hasattr(layer.mixer, "experts"))
    assert not any(p.requires_grad for n, p in experts.named_parameters() if "lora_" not in n)


def test_lora_on_the_lm_reaches_experts_too():
    """peft=lora (language model only, as NeMo Automodel's Omni LoRA recipe) selects the fused expert weights."""
    cfg = compose(["model=tiny_nemotron_vl", "peft=lora"])
    model = load_model(resolve_source(cfg.model), cfg.model)
    chosen = select_lora_parameters(model, FAMILY, cfg.peft)
    assert chosen and all(n.endswith(GROUPS["experts"]) and component_of(FAMILY, n) == "language_model"
                          for n in chosen)
    assert select_lora_parameters(model, FAMILY, compose(["peft=lora", "peft.exclude_modules=[*experts*]"]).peft) == []
    with pytest.raises(LoraTargetError, match="peft.dropout"):  # peft's parameter LoRA takes no dropout
        apply_peft(model, FAMILY, compose(["peft=lora", "peft.dropout=0.1"]).peft)


def _adapters(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint / "model" / "adapter_model.safetensors"))


def _key(module_name: str, matrix: str) -> str:
    """A LoRA layer's weight as peft saves it (adapter name dropped)."""
    return f"{module_name}.lora_{matrix}.weight"


def test_lora_all_adapters_on_attention_mamba_and_experts_train(tmp_path):
    """The run itself (launch.py's path): after step 1 every B matrix moved off its zero init; step 2 moves A and B
    again, for attention, Mamba and the experts alike."""
    model, _, _ = _built(["peft=lora_all"])
    adapted = {t: name for t, name in _adapted(model).items() if _group(t)}
    del model
    cfg = compose(["model=tiny_nemotron_vl", "peft=lora_all", "tracking=none", "eval=none",
                   "step_scheduler.max_steps=2", "step_scheduler.global_batch_size=2",
                   "step_scheduler.micro_batch_size=2", "step_scheduler.ckpt_every_steps=1",
                   "step_scheduler.val_every_steps=100", "dataset.max_val_samples=2"])
    result = run(cfg, tmp_path)
    assert result.status == "FINISHED" and result.step == 2
    first, second = (_adapters(tmp_path / "checkpoints" / f"step_{n}") for n in (1, 2))
    moved = {}
    for target, name in adapted.items():
        a, b = _key(name, "A"), _key(name, "B")
        assert a in first and b in first, (target, sorted(first)[:4])
        moved[target] = (first[b].abs().sum() > 0 and not torch.equal(first[a], second[a])
                         and not torch.equal(first[b], second[b]))
    assert {_group(t) for t in moved} == set(GROUPS)
    assert [t for t, ok in moved.items() if not ok] == []


def _audio_batch(processor):
    """One conversation with a 1 s clip: the processor expands it into <so_embedding> tokens + mel features."""
    clip = np.random.RandomState(0).randn(16000).astype("float32") * 0.1
    conversation = [{"role": "user", "content": [{"type": "audio", "audio": clip},
                                                 {"type": "text", "text": "What is said?"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": "hello"}]}]
    return processor.apply_chat_template([conversation], tokenize=True, return_dict=True, return_tensors="pt")


@pytest.mark.parametrize("freeze,frozen", [("vision_frozen", True), ("none", False)])
def test_freeze_audio_tower_freezes_the_audio_branch_audio_flows_through(freeze, frozen):
    model, processor, cfg = _built(["peft=none", f"freeze={freeze}"])
    assert cfg.freeze.freeze_audio_tower is (True if frozen else None)
    audio = {n: p for n, p in model.named_parameters() if component_of(FAMILY, n) == "audio_tower"}
    assert any(n.startswith("audio_tower.") for n in audio) and any(n.startswith("embed_audio.") for n in audio)
    assert all(p.requires_grad is not frozen for p in audio.values())
    assert any(p.requires_grad for n, p in model.named_parameters() if component_of(FAMILY, n) == "language_model")
    batch = _audio_batch(processor)
    assert (batch["input_ids"] == model.config.audio_token_id).sum() > 0 and "input_features" in batch
    model(**batch, labels=batch["input_ids"]).loss.backward()
    grads = [p.grad for p in audio.values()]
    assert all(g is None for g in grads) if frozen else any(g is not None and g.abs().sum() > 0 for g in grads)


def test_omni_experiments_follow_the_automodel_recipes():
    """NeMo Automodel's examples/vlm_finetune/nemotron_omni/nemotron_omni_cord_v2{,_peft}.yaml, as the YAMLs cite."""
    sft = compose(["experiment=nemotron_omni_cord_v2"])
    assert sft.model.pretrained_model_name_or_path == "nvidia/Nemotron-3-Nano-Omni-30B-A3B-Reasoning-BF16"
    assert (sft.model.family, sft.model.trust_remote_code) == ("nemotron_vl", False)
    assert (sft.optimizer.lr, sft.optimizer.weight_decay, list(sft.optimizer.betas), sft.optimizer.eps) == \
        (6e-6, 0.01, [0.9, 0.95], 1e-8)
    assert sft.model.dtype == "float32" and sft.scheduler.name == "constant"  # fp32 master weights, no lr schedule
    assert (sft.step_scheduler.global_batch_size, sft.step_scheduler.micro_batch_size, sft.step_scheduler.max_steps,
            sft.step_scheduler.ckpt_every_steps, sft.step_scheduler.val_every_steps) == (8, 1, 400, 100, 200)
    assert sft.dataset.max_length == 4096 and sft.parallel.activation_checkpointing and sft.peft.method == "none"
    assert (sft.freeze.freeze_embeddings, sft.freeze.freeze_vision_tower, sft.freeze.freeze_audio_tower) == \
        (True, True, True)
    lora = compose(["experiment=nemotron_omni_cord_v2_lora"])
    assert (lora.peft.method, lora.peft.dim, lora.peft.alpha, lora.peft.match_all_linear) == ("lora", 64, 128, False)
    assert (lora.optimizer.lr, lora.model.dtype, lora.step_scheduler.max_steps) == (1e-3, "bfloat16", 400)
    assert lora.freeze.freeze_audio_tower is True
    twin = compose(["experiment=nemotron_omni_cord_v2_lora", "model=tiny_nemotron_vl"])
    assert twin.model.dtype == "float32"  # the tiny twin keeps its own dtype (no fp32/bf16 override leaks in)
