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


class _VocabProjections(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts rows that matrix products project onto the vocabulary (outputs ``vocab`` wide)."""

    MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab, self.rows = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in self.MATMULS and out.shape[-1] == self.vocab:
            self.rows += out.numel() // self.vocab
        return out


def test_each_labelled_row_is_projected_onto_the_vocabulary_once(model_and_batch):
    """No recompute in the backward: the LM head is the largest product of a small VLM's step
    (Gemma 3: 262k words), and projecting every chunk twice cost +28% of a 30M model's step."""
    from vlm_sweep.training.loss import output_head

    model, batch = model_and_batch
    head = output_head(model)
    counter = _VocabProjections(head.weight.shape[0])
    with counter:
        summed_token_loss(model, batch, chunk_rows=7, small_logits_bytes=0).backward()  # chunked, as at 262k words
    model.zero_grad()
    assert counter.rows == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def test_a_wrapped_lm_head_gets_the_same_loss_and_gradients(receipts_dir):
    """LoRA on the LM head itself (a head that is no plain Linear) takes the checkpointed path."""
    from peft import LoraConfig, get_peft_model

    from vlm_sweep.data.collate import VLMCollator
    from vlm_sweep.data.datasets import build_datasets
    from vlm_sweep.models.load import load_model_and_processor

    cfg = compose(["model=tiny_gemma3"])
    torch.manual_seed(0)
    model, processor = load_model_and_processor(cfg.model)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["lm_head"], init_lora_weights=False))
    train = build_datasets(cfg.dataset)["train"]
    batch = VLMCollator(processor, cfg.dataset.max_length)([train[0], train[1]])
    expected = _reference_loss(model, batch)
    expected.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    expected_grads = [p.grad.clone() for p in params]
    model.zero_grad()
    got = summed_token_loss(model, batch, chunk_rows=5, small_logits_bytes=0)
    got.backward()
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-4)
    for p, g in zip(params, expected_grads):
        assert (p.grad - g).abs().max() <= 1e-5 * g.abs().max() + 1e-7


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_cross_entropy_equals_autograd_with_bias_and_autocast(dtype):
    from vlm_sweep.training.linear_ce import linear_cross_entropy_sum

    torch.manual_seed(0)
    rows = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    bias = torch.randn(50, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    results = []
    for loss_fn in (lambda: F.cross_entropy(F.linear(rows, weight, bias).float(), targets, reduction="sum"),
                    lambda: linear_cross_entropy_sum(rows, weight, bias, targets, chunk_rows=8)):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = loss_fn()
        results.append((loss.detach(), torch.autograd.grad(0.25 * loss, [rows, weight, bias])))
    (expected, expected_grads), (got, got_grads) = results
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)
    for g, e in zip(got_grads, expected_grads):
        assert g.dtype == e.dtype
        torch.testing.assert_close(g, e, rtol=tolerance, atol=tolerance * e.abs().max().item())
