"""What the training loop needs to know, as one small typed object (no config tree).

The Trainer is a YAML-free component: the recipe (``vlm_sweep.train``) reads the
composed config once and hands the loop these values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional


@dataclass(frozen=True)
class TrainerSettings:
    """Steps, cadences and limits of one run."""

    max_steps: int
    global_batch_size: int
    micro_batch_size: int
    family: str  # model family (FLOP accounting by component)
    log_every_steps: int = 1
    val_every_steps: int = 10**9
    ckpt_every_steps: int = 10**9
    max_val_batches: Optional[int] = None
    max_grad_norm: Optional[float] = None  # None/0: measure the norm only
    peak_tflops: Optional[float] = None  # None: looked up from the device name
    dataset_name: str = "data"
    record_format: str = ""  # the data set spec whose metric scores generations
    min_usable_fraction: float = 0.5
    eval_every_steps: Optional[int] = None
    eval_max_new_tokens: int = 256
    eval_batch_size: int = 4
    best_metric: Optional[str] = None  # val_loss, eval/<name>, or None

    @classmethod
    def from_config(cls, cfg: Any) -> "TrainerSettings":
        """The values the loop reads, from a composed run config."""
        steps = cfg.step_scheduler
        return cls(
            max_steps=int(steps.max_steps), global_batch_size=int(steps.global_batch_size),
            micro_batch_size=int(steps.micro_batch_size), log_every_steps=int(steps.log_every_steps),
            val_every_steps=int(steps.val_every_steps), ckpt_every_steps=int(steps.ckpt_every_steps),
            max_val_batches=steps.max_val_batches, max_grad_norm=cfg.optimizer.max_grad_norm,
            family=str(cfg.model.family), peak_tflops=cfg.tracking.peak_tflops,
            dataset_name=str(cfg.dataset.name), record_format=str(cfg.dataset.format),
            min_usable_fraction=float(cfg.dataset.min_usable_fraction),
            eval_every_steps=cfg.eval.every_steps, eval_max_new_tokens=int(cfg.eval.max_new_tokens),
            eval_batch_size=int(cfg.eval.batch_size), best_metric=cfg.checkpoint.best_metric or None)
