"""Summed cross-entropy of ``rows @ weight.T (+ bias)``, chunk by chunk, gradients taken in the forward.

The LM head of a 262k-word vocabulary is the largest matrix product of a small VLM's step, and its
fp32 logits the largest tensor (~1 MiB per labelled token). Checkpointing each chunk keeps memory
flat but projects every chunk twice (once more in the backward: +50% of the head's work, +28% of a
30M Gemma 3 step on a CPU). Here each chunk is projected once: its logits, softmax and the
gradients with respect to the rows (and the weight, when it trains) are computed right away and the
logits dropped, as Liger's fused linear cross-entropy does. The backward only scales the stored
gradients by the incoming one. Same value and gradients as ``F.cross_entropy(rows @ W.T, targets,
reduction="sum")`` within float tolerance, and the same work as autograd on full logits.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F


class LinearCrossEntropy(torch.autograd.Function):
    """``sum_i CE(rows_i @ weight.T + bias, targets_i)``; no ``(rows, vocab)`` tensor outlives a chunk."""

    @staticmethod
    def forward(ctx: Any, rows: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                targets: torch.Tensor, chunk_rows: int) -> torch.Tensor:
        need_rows = ctx.needs_input_grad[0]
        need_weight, need_bias = ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]
        grad_rows = torch.empty_like(rows) if need_rows else None
        # Accumulated in fp32 over the chunks (the parameter's dtype may be bf16).
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_bias else None
        total = torch.zeros((), dtype=torch.float32, device=rows.device)
        for start in range(0, rows.shape[0], chunk_rows):
            part = rows[start:start + chunk_rows]
            part_targets = targets[start:start + chunk_rows]
            logits = F.linear(part, weight, bias).float()
            log_normaliser = torch.logsumexp(logits, dim=-1)
            index = torch.arange(part_targets.numel(), device=logits.device)
            total += (log_normaliser - logits[index, part_targets]).sum()
            if grad_rows is None and grad_weight is None and grad_bias is None:
                continue
            # d(sum CE)/d(logits) = softmax - one_hot(target), built in place of the logits.
            grad_logits = logits.sub_(log_normaliser.unsqueeze(1)).exp_()
            grad_logits[index, part_targets] -= 1.0
            grad_logits = grad_logits.to(_compute_dtype(part, weight))
            if grad_rows is not None:
                grad_rows[start:start + chunk_rows] = grad_logits @ weight.to(grad_logits.dtype)
            if grad_weight is not None:
                grad_weight += grad_logits.t() @ part.to(grad_logits.dtype)
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0, dtype=torch.float32)
        ctx.save_for_backward(*(g for g in (grad_rows, grad_weight, grad_bias) if g is not None))
        ctx.has = (grad_rows is not None, grad_weight is not None, grad_bias is not None)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        saved = iter(ctx.saved_tensors)
        grad_rows, grad_weight, grad_bias = (next(saved) if has else None for has in ctx.has)
        scale = grad_total.float()
        if grad_rows is not None:
            grad_rows = grad_rows * scale.to(grad_rows.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * scale).to(ctx.dtypes[0])
        if grad_bias is not None:
            grad_bias = (grad_bias * scale).to(ctx.dtypes[1])
        return grad_rows, grad_weight, grad_bias, None, None


def _compute_dtype(rows: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the forward's matrix products ran in (autocast's, else the rows')."""
    if torch.is_autocast_enabled(rows.device.type):
        return torch.get_autocast_dtype(rows.device.type)
    return torch.promote_types(rows.dtype, weight.dtype)


def linear_cross_entropy_sum(rows: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                             targets: torch.Tensor, chunk_rows: int) -> torch.Tensor:
    """Summed next-token cross-entropy of ``rows`` through a linear head, ``chunk_rows`` rows at a time."""
    return LinearCrossEntropy.apply(rows, weight, bias, targets, max(1, int(chunk_rows)))
