"""parallel.activation_checkpointing: blocks are recomputed in the backward, the maths is unchanged."""

from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES, compose



def _model_and_batch(model_name, receipts_dir, checkpointing):
    from vlm_sweep.data.collate import VLMCollator
    from vlm_sweep.data.datasets import build_datasets
    from vlm_sweep.models.load import load_model_and_processor
    from vlm_sweep.models.registry import get_family
    from vlm_sweep.train import enable_activation_checkpointing
    from vlm_sweep.training.freeze import apply_freeze
    from vlm_sweep.training.lora import apply_lora

    cfg = compose([f"model={model_name}", "peft=lora", "peft.dropout=0.0"])
    family = get_family(cfg.model.family)
    model, processor = load_model_and_processor(cfg.model)
    if checkpointing:
        enable_activation_checkpointing(model)
    torch.manual_seed(0)
    model = apply_lora(model, family, cfg.peft, cfg.freeze)
    apply_freeze(model, family, cfg.freeze)
    model.train()
    train = build_datasets(cfg.dataset)["train"]
    batch = VLMCollator(processor, cfg.dataset.max_length)([train[0], train[1]])
    return model, batch


def _decoder_layers(model):
    """The repeated blocks: the modules transformers checkpoints."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


@pytest.mark.parametrize("model_name", FAMILIES)
def test_checkpointing_recomputes_blocks_and_keeps_loss_and_gradients(model_name, receipts_dir):
    from vlm_sweep.training.loss import summed_token_loss

    results = {}
    for checkpointing in (False, True):
        model, batch = _model_and_batch(model_name, receipts_dir, checkpointing)
        layers = _decoder_layers(model)
        assert layers, "no checkpointable block found"
        calls = []
        # transformers checkpoints a block's forward (its own hooks stay outside): count its children.
        children = [child for layer in layers for child in layer.children()]
        handles = [child.register_forward_pre_hook(lambda *a: calls.append(1)) for child in children]
        loss = summed_token_loss(model, batch)
        forward_calls = len(calls)
        loss.backward()
        for h in handles:
            h.remove()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[checkpointing] = (loss.detach(), grads, forward_calls, len(calls))
    plain, ckpt = results[False], results[True]
    assert plain[3] == plain[2], "without checkpointing no block runs again in the backward"
    assert ckpt[3] > ckpt[2], "with checkpointing blocks are recomputed in the backward"
    assert torch.allclose(plain[0], ckpt[0], rtol=1e-5)
    assert plain[1].keys() == ckpt[1].keys() and plain[1]
    for name in plain[1]:
        assert torch.allclose(plain[1][name], ckpt[1][name], rtol=1e-4, atol=1e-6), name
