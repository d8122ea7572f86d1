"""FLOP/MFU accounting: the counted FLOPs equal torch's measured matmul FLOPs, vision tower included."""

from __future__ import annotations

import math
from typing import Dict, Tuple

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from conftest import FAMILIES, compose
from vlm_sweep.models.registry import ModelFamily, get_family
from vlm_sweep.training.flops import FlopCounter, StepTally
from vlm_sweep.training.mfu import peak_tflops, step_report
from vlm_sweep.training.loss import output_head, summed_token_loss

FULL, LORA = ("none", "none"), ("lora", "vision_frozen")  # (peft, freeze): full fine-tuning / the LoRA default
TOLERANCE = 0.10  # Nemotron's Mamba scan runs as a reference einsum chain that is a bit costlier than SSD


def _conv_backward_flops(grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed,
                         output_padding, groups, output_mask, out_shape=None) -> int:
    """torch's own formula ignores ``groups`` in the backward (a depthwise conv is counted x channels)."""
    forward = 2 * math.prod(grad_out_shape) * math.prod(w_shape[1:])
    return forward * (int(output_mask[0]) + int(output_mask[1]))


def _measure() -> FlopCounterMode:
    return FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: _conv_backward_flops})


@pytest.fixture(scope="module")
def setups(receipts_dir):
    """(model family, (peft, freeze)) -> (model, batch, family name); each built once per module."""
    from vlm_sweep.data.collate import VLMCollator
    from vlm_sweep.data.datasets import build_datasets
    from vlm_sweep.models.load import load_model_and_processor
    from vlm_sweep.training.freeze import apply_freeze
    from vlm_sweep.training.lora import apply_lora

    built: Dict[Tuple[str, Tuple[str, str]], tuple] = {}

    def get(name: str, setup: Tuple[str, str]) -> tuple:
        if (name, setup) not in built:
            # eager attention: its matmuls are visible to FlopCounterMode (CPU SDPA's kernel is not)
            cfg = compose([f"model={name}", "model.attn_implementation=eager", f"peft={setup[0]}",
                           f"freeze={setup[1]}"])
            torch.manual_seed(0)
            model, processor = load_model_and_processor(cfg.model)
            family = get_family(cfg.model.family)
            if cfg.peft.method == "lora":
                model = apply_lora(model, family, cfg.peft, cfg.freeze)
            apply_freeze(model, family, cfg.freeze)
            model.train()
            train = build_datasets(cfg.dataset)["train"]
            batch = VLMCollator(processor, cfg.dataset.max_length)([train[0], train[1], train[2]])
            built[(name, setup)] = (model, batch, cfg.model.family)
        return built[(name, setup)]
    return get


def _train_pass(model, batch) -> None:
    model.zero_grad(set_to_none=True)
    summed_token_loss(model, batch).backward()


def _measured_vision_forward(measured: FlopCounterMode, family: ModelFamily) -> int:
    """FlopCounterMode's FLOPs inside the vision tower and projector modules (outermost paths)."""
    paths = [p for c in ("vision_tower", "vision_projection") for p in family.components[c]]
    outermost = [p for p in paths if not any(p.startswith(q + ".") for q in paths)]
    counts = {k: sum(v.values()) for k, v in measured.get_flop_counts().items()}
    return sum(counts.get(min((k for k in counts if k.endswith("." + p)), key=len, default=""), 0) for p in outermost)


@pytest.mark.parametrize("setup", [FULL, LORA], ids=["full", "lora"])
@pytest.mark.parametrize("name", FAMILIES)
def test_counted_flops_match_measured_flops(setups, name, setup):
    model, batch, family = setups(name, setup)
    counter = FlopCounter(model, family)
    try:
        with _measure() as measured:
            summed_token_loss(model, batch)  # the forward alone
        forward = counter.tally()
        # The fused LM-head loss takes its backward's products (d rows, d weight when the head trains) in the
        # forward; over the whole step the sums agree (below).
        head, labelled = output_head(model), int((batch["labels"][:, 1:] != -100).sum())
        taken_early = 2.0 * head.in_features * head.out_features * labelled * (1 + head.weight.requires_grad)
        assert sum(forward.forward_flops.values()) == pytest.approx(measured.get_total_flops() - taken_early,
                                                                    rel=TOLERANCE)
        vision = forward.forward_flops["vision_tower"] + forward.forward_flops["vision_projection"]
        assert vision > 0
        assert vision == pytest.approx(_measured_vision_forward(measured, get_family(family)), rel=0.01)

        counter.reset()
        with _measure() as measured:
            _train_pass(model, batch)
        # Forward + backward: what the hardware did is what the model needed (the fused loss recomputes nothing).
        assert counter.tally().flops == pytest.approx(measured.get_total_flops(), rel=TOLERANCE)
    finally:
        counter.close()


@pytest.mark.parametrize("name", FAMILIES)
def test_frozen_vision_tower_under_lora_costs_less_than_full_finetuning(setups, name):
    tallies = {}
    for setup in (FULL, LORA):
        model, batch, family = setups(name, setup)
        counter = FlopCounter(model, family)
        _train_pass(model, batch)
        tallies[setup] = counter.tally()
        counter.close()
    full, lora = tallies[FULL], tallies[LORA]
    assert lora.flops < full.flops
    for part in ("vision_tower", "vision_projection"):
        assert lora.forward_flops[part] == full.forward_flops[part] > 0
        assert full.backward_flops[part] > 0
        assert lora.backward_flops.get(part, 0.0) == 0.0  # frozen, nothing trainable before it: no backward
    assert 0 < lora.metrics()["vision_flops_fraction"] < full.metrics()["vision_flops_fraction"] < 1


@pytest.mark.parametrize("name", FAMILIES)
def test_image_and_text_tokens_add_up_to_the_lm_sequence(setups, name):
    model, batch, family = setups(name, LORA)
    by_token_id = FlopCounter(model, family)
    by_projector = FlopCounter(model, family, media_token_ids=[])  # a config naming no image token id
    summed_token_loss(model, batch)
    for tally in (by_token_id.tally(), by_projector.tally()):
        real = int(batch["attention_mask"].sum())
        assert tally.image_tokens > 0 and tally.text_tokens > 0
        assert tally.image_tokens + tally.text_tokens == real
        assert tally.image_tokens + tally.text_tokens + tally.pad_tokens == tally.rows["language_model"]
        assert tally.rows["language_model"] == batch["input_ids"].numel()
        assert tally.image_tokens == tally.rows["vision_projection"]  # one LM position per projected row
        assert tally.rows["vision_tower"] >= tally.image_tokens
    by_token_id.close()
    by_projector.close()


@pytest.mark.parametrize("name", FAMILIES)
def test_validation_and_generation_forwards_are_not_training_flops(setups, name):
    model, batch, family = setups(name, LORA)
    counter = FlopCounter(model, family)
    with torch.no_grad():
        summed_token_loss(model, batch)
    assert counter.tally() == StepTally()
    summed_token_loss(model, batch)
    assert counter.tally().flops > 0
    counter.close()


@pytest.mark.parametrize("name", FAMILIES)
def test_activation_checkpoint_recompute_is_not_counted(setups, name):
    model, batch, family = setups(name, FULL)
    counter = FlopCounter(model, family)
    _train_pass(model, batch)
    plain = counter.tally()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    try:
        counter.reset()
        _train_pass(model, batch)
        checkpointed = counter.tally()
    finally:
        model.activation_checkpointing_disable()
        counter.close()
    assert checkpointed.flops == pytest.approx(plain.flops, rel=1e-9)


def test_fused_mixture_of_experts_weights_are_counted_per_routed_token(setups):
    """Nemotron 3's routed experts are 3-D parameters, not Linears: counted by the pairs the router picked."""
    model, _, family = setups("tiny_nemotron_vl", FULL)
    name, experts = next((n, m) for n, m in model.named_modules() if n.endswith("mixer.experts"))
    up, down = experts.up_proj, experts.down_proj
    assert up.dim() == 3 and up.shape[0] >= 2
    hidden = torch.randn(5, up.shape[-1], requires_grad=True)
    index = torch.tensor([[0, 1], [1, 0], [0, 1], [1, 0], [0, up.shape[0] - 1]])  # 10 (token, expert) pairs
    weights = torch.full(index.shape, 0.5)
    counter = FlopCounter(experts, family)
    # The per-expert loop (eager) shows its matmuls to FlopCounterMode; grouped/batched mm kernels do not.
    implementation, experts.config._experts_implementation = experts.config._experts_implementation, "eager"
    try:
        with _measure() as measured:
            experts(hidden, index, weights)
        counted = counter.tally()
    finally:
        counter.close()
        experts.config._experts_implementation = implementation
    assert sum(counted.forward_flops.values()) == pytest.approx(measured.get_total_flops(), rel=0.01)
    assert sum(counted.forward_flops.values()) == 2 * 10 * (up[0].numel() + down[0].numel())
    assert sum(counted.backward_flops.values()) == 2 * sum(counted.forward_flops.values())  # input + weight grads


def test_an_output_projection_applied_by_a_fused_kernel_is_counted():
    """Mamba's training kernel takes ``out_proj.weight`` without calling ``out_proj``."""
    class Fused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.in_proj, self.out_proj = nn.Linear(8, 16), nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.linear(torch.relu(self.in_proj(x)), self.out_proj.weight, self.out_proj.bias)

    class Toy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lm = Fused()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lm(x)

    family = ModelFamily(auto_model_class="-", processor_class="-", components={"language_model": ("lm",)})
    model = Toy()
    counter = FlopCounter(model, family)
    x = torch.randn(2, 5, 8)
    with _measure() as measured:
        model(x).sum().backward()
    tally = counter.tally()
    assert tally.flops == measured.get_total_flops()  # in_proj: fwd + dW; out_proj: fwd + dX + dW
    assert tally.rows == {"language_model": 10}


def test_tallies_sum_over_ranks_with_one_collective():
    tally = StepTally({"vision_tower": 1.0, "language_model": 2.0}, {"language_model": 4.0},
                      {"vision_tower": 3, "language_model": 7}, image_tokens=2, text_tokens=5, pad_tokens=1)
    calls = []
    summed = tally.summed(lambda t: calls.append(t) or t * 2)  # two ranks with equal tallies
    assert len(calls) == 1
    assert summed == StepTally({"vision_tower": 2.0, "language_model": 4.0}, {"language_model": 8.0},
                               {"vision_tower": 6, "language_model": 14}, 4, 10, 2)
    assert summed.flops == 14.0


@pytest.mark.parametrize("device_name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L40S", 362.0), ("NVIDIA L4", 121.0), ("NVIDIA A10G", 125.0),
    ("NVIDIA GeForce RTX 4090", 165.0), ("NVIDIA B200", 2250.0), ("NVIDIA GB200", 2500.0),
    ("AMD Instinct MI300X", 1307.0), ("Some Future Accelerator", None),
])
def test_peak_tflops_by_device_name(device_name, peak):
    assert peak_tflops(device_name) == peak


def test_mfu_is_achieved_tflops_per_device_over_the_peak():
    peak = peak_tflops("NVIDIA H100 80GB HBM3")
    report = step_report(step_flops=2 * 494.5e12 * 3.0, seconds=3.0, num_devices=2, peak=peak)
    assert report["tflops"] == pytest.approx(494.5)
    assert report["mfu"] == pytest.approx(494.5 / 989.0)
    assert peak_tflops(torch.device("cpu")) is None
    assert "mfu" not in step_report(1e12, 1.0, 1, peak_tflops(torch.device("cpu")))
    assert peak_tflops(torch.device("cpu"), override=100.0) == 100.0  # tracking config names the peak
    with pytest.raises(ValueError, match="peak TFLOPS must be > 0"):
        peak_tflops("NVIDIA H100 80GB HBM3", override=0)
