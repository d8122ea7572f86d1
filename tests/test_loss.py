"""The memory-safe loss equals full-logits cross-entropy, value and gradients, for every family."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import FAMILIES, compose
from vlm_sweep.training.loss import IGNORE_INDEX, SMALL_LOGITS_BYTES, labelled_positions, summed_token_loss



def _reference_loss(model, batch):
    """The loss as it was: full logits for every position, upcast, summed over labels."""
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "num_skipped", "record_ids")}
    logits = model(**inputs, use_cache=False).logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch["labels"][:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


@pytest.fixture(scope="module", params=FAMILIES)
def model_and_batch(request, receipts_dir):
    from vlm_sweep.data.collate import VLMCollator
    from vlm_sweep.data.datasets import build_datasets
    from vlm_sweep.models.load import load_model_and_processor

    cfg = compose([f"model={request.param}"])
    torch.manual_seed(0)
    model, processor = load_model_and_processor(cfg.model)
    model.train()
    train = build_datasets(cfg.dataset)["train"]
    batch = VLMCollator(processor, cfg.dataset.max_length)([train[0], train[1], train[2]])
    return model, batch


def test_labelled_positions_select_the_shifted_targets():
    labels = torch.tensor([[-100, -100, 5, 6], [-100, 7, -100, 8]])
    mask, targets = labelled_positions(labels)
    assert mask.tolist() == [[False, True, True, False], [True, False, True, False]]
    assert targets.tolist() == [5, 6, 7, 8]


@pytest.mark.parametrize("chunk_rows, small_logits_bytes", [(7, 0), (100_000, 0), (7, SMALL_LOGITS_BYTES)],
                         ids=["chunks", "one-checkpointed-chunk", "small-logits-at-once"])
def test_loss_and_gradients_equal_full_logits_loss(model_and_batch, chunk_rows, small_logits_bytes):
    model, batch = model_and_batch
    params = [p for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    torch.manual_seed(1)
    expected = _reference_loss(model, batch)
    expected.backward()
    expected_grads = [None if p.grad is None else p.grad.clone() for p in params]
    model.zero_grad()
    torch.manual_seed(1)
    got = summed_token_loss(model, batch, chunk_rows=chunk_rows, small_logits_bytes=small_logits_bytes)
    got.backward()
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-4), (got, expected)
    assert any(g is not None for g in expected_grads)
    for p, g in zip(params, expected_grads):
        assert (p.grad is None) == (g is None)
        if g is not None:
            # Relative to the tensor's scale: a summed loss has large gradients, and summation order
            # (labelled rows vs every row through a tied head) moves the small entries by float noise.
            assert (p.grad - g).abs().max() <= 1e-5 * g.abs().max() + 1e-7


def test_no_label_batch_gives_zero_loss_with_a_graph(model_and_batch):
    model, batch = model_and_batch
    unlabelled = {**batch, "labels": torch.full_like(batch["labels"], IGNORE_INDEX)}
    loss = summed_token_loss(model, unlabelled)
    assert loss.item() == 0.0 and loss.requires_grad
