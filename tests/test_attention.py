"""The configured (fast) attention gives the same outputs as eager attention, for every family."""

from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES, compose


@pytest.mark.parametrize("model_name", FAMILIES)
def test_sdpa_matches_eager(model_name, receipts_dir):
    from vlm_sweep.data.collate import VLMCollator
    from vlm_sweep.data.datasets import build_datasets
    from vlm_sweep.models.load import load_model_and_processor

    outputs = {}
    for attention in ("eager", "sdpa"):
        cfg = compose([f"model={model_name}", f"model.attn_implementation={attention}"])
        model, processor = load_model_and_processor(cfg.model)
        train = build_datasets(cfg.dataset)["train"]
        batch = VLMCollator(processor, cfg.dataset.max_length)([train[0], train[1]])
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "num_skipped", "record_ids")}
        with torch.no_grad():
            outputs[attention] = model.eval()(**inputs, use_cache=False).logits
        mask = batch["attention_mask"].bool()
    assert torch.allclose(outputs["eager"][mask], outputs["sdpa"][mask], atol=1e-4, rtol=1e-4)


def test_hub_configs_use_the_fastest_correct_attention():
    from vlm_sweep.models.load import resolve_attention

    for name in ("gemma3", "qwen2_5_vl"):
        assert compose([f"model={name}"]).model.attn_implementation == "auto"
    # Nemotron's remote-code class declares no SDPA support: the checkpoint's own setting is kept.
    assert compose(["model=nemotron_nano_v2_vl"]).model.attn_implementation is None
    # No CUDA (or no flash_attn) here: auto is SDPA, which the test above holds equal to eager.
    assert resolve_attention("auto") == "sdpa"
    assert resolve_attention("eager") == "eager" and resolve_attention(None) is None
