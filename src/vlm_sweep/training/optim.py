"""AdamW over trainable parameters and a warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math
from typing import Any

import torch


def build_optimizer(model: Any, optimizer_cfg: Any) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norms (1-D parameters)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": optimizer_cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=optimizer_cfg.lr,
        betas=tuple(optimizer_cfg.betas),
        eps=optimizer_cfg.eps,
    )


def lr_factor(step: int, *, max_steps: int, warmup_steps: int, min_ratio: float, name: str) -> float:
    """Multiplier on the peak lr at ``step`` (0-based): linear warmup, then cosine to min_ratio."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if name == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, scheduler_cfg: Any, max_steps: int,
                    peak_lr: float) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR stepping once per optimizer step."""
    min_ratio = scheduler_cfg.min_lr / peak_lr

    def factor(step: int) -> float:
        return lr_factor(step, max_steps=max_steps, warmup_steps=scheduler_cfg.warmup_steps,
                         min_ratio=min_ratio, name=scheduler_cfg.name)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
