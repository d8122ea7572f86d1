"""A run's checkpoints as one object: where they live, when one is the best, where to resume.

The recipe builds a ``Checkpointer``; the Trainer calls ``save`` at its checkpoint steps.
Everything about a run's checkpoint story is here: the checkpoint root (``checkpoint.dir``,
relative to the run dir), ``LATEST``/``BEST`` and ``keep_last`` (through
``training.checkpoint``), the best value so far (kept in the trainer's history so it
survives a resume), the path saved last, and the step a resumed run continues from (the
offset the tracker's records are cut back to).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Optional

log = logging.getLogger(__name__)


def checkpoint_root(checkpoint_cfg: Any, run_dir: Path) -> Path:
    """``checkpoint.dir``, relative to the run dir unless absolute."""
    root = Path(checkpoint_cfg.dir)
    return root if root.is_absolute() else Path(run_dir) / root


def resume_point(checkpoint_cfg: Any, run_dir: Path) -> Optional[Path]:
    """The checkpoint this run continues from (None: a fresh start), decided before anything heavy loads:
    a wrong ``checkpoint.resume`` is one line in seconds (CheckpointError), not after the model load."""
    from vlm_sweep.training import checkpoint as ckpt

    return ckpt.resolve_resume(checkpoint_cfg, checkpoint_root(checkpoint_cfg, run_dir))


class Checkpointer:
    """Saves and restores one run's training state."""

    def __init__(self, checkpoint_cfg: Any, run_dir: Path, *, accelerator: Any, processor: Any,
                 optimizer: Any, scheduler: Any, dataloader: Any, config_yaml: str,
                 resume_from: Optional[Path] = None, precision: Optional[str] = None) -> None:
        """``resume_from``: ``resume_point``'s answer, taken before the model loaded; ``precision``: the
        run's compute precision, recorded in each checkpoint (a resumed auto run keeps it)."""
        self.root = checkpoint_root(checkpoint_cfg, run_dir)
        self.resume_from = resume_from
        self.cfg = checkpoint_cfg
        self.acc, self.processor = accelerator, processor
        self.optimizer, self.scheduler, self.dataloader = optimizer, scheduler, dataloader
        self.config_yaml = config_yaml
        self.precision = precision
        self.last_saved: Optional[Path] = None
        self.resumed_at: Optional[int] = None  # the step a resumed run continues from; None: a fresh start

    def resume(self, trainer: Any) -> Optional[int]:
        """Load the checkpoint ``checkpoint.resume`` points at into the trainer and its parts.

        Returns the step resumed at, or None for a fresh start. Raises CheckpointError (before
        anything changes) for a checkpoint that does not fit this config.
        """
        from vlm_sweep.training import checkpoint as ckpt

        path = self.resume_from
        if path is None:
            return None
        state = ckpt.load_checkpoint(path, accelerator=self.acc, model=trainer.model, optimizer=self.optimizer,
                                     scheduler=self.scheduler, dataloader=self.dataloader)
        trainer.load_trainer_state(state)
        self.last_saved, self.resumed_at = path, trainer.step
        log.info("resumed from %s at step %d", path, trainer.step)
        return trainer.step

    def save(self, trainer: Any, metrics: Dict[str, float]) -> None:
        """Checkpoint the trainer's step; mark it BEST if ``checkpoint.best_metric`` improved."""
        if not self.cfg.enabled:
            return
        from vlm_sweep.training import checkpoint as ckpt

        best_metric, is_best = self.cfg.best_metric, False
        if best_metric and best_metric in metrics:
            value = metrics[best_metric]
            if ckpt.is_better(value, trainer.history.get("best_value"), self.cfg.best_mode):
                trainer.history.update(best_value=value, best_step=trainer.step)
                is_best = True
        self.last_saved = ckpt.save_checkpoint(
            self.root, trainer.step, accelerator=self.acc, model=trainer.model, processor=self.processor,
            optimizer=self.optimizer, scheduler=self.scheduler, dataloader=self.dataloader,
            trainer_state={**trainer.trainer_state(), ckpt.PRECISION_KEY: self.precision},
            config_yaml=self.config_yaml, checkpoint_cfg=self.cfg,
            is_best=is_best)
