"""Glue between Hydra's job and the recipe: validation, logging, the closing summary."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig

log = logging.getLogger("vlm_sweep")

# Errors whose message is the whole story: print one line, no traceback.
USER_ERRORS = ("ConfigError", "ModelLoadError", "DatasetLoadError", "BadRecordError",
               "CheckpointError", "LoraTargetError")


def _run_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def format_summary(result) -> str:
    def fmt(v: Optional[float]) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    lines = [
        f"run {result.status} at step {result.step}: loss {fmt(result.first_loss)} -> "
        f"{fmt(result.final_loss)}, val_loss {fmt(result.val_loss)}",
        f"  run dir:    {result.run_dir}",
        f"  checkpoint: {result.checkpoint or 'none'}",
    ]
    if result.mlflow_run_id:
        lines.append(f"  mlflow:     run {result.mlflow_run_id} in {result.mlflow_uri}")
    return "\n".join(lines)


def run_job(cfg: DictConfig) -> Optional[float]:
    """Validate, train, print the summary; user errors exit 2 with one line."""
    from vlm_sweep.config.validate import validate_config

    try:
        validate_config(cfg)
        from vlm_sweep.train import run

        result = run(cfg, _run_dir())
    except Exception as err:
        if type(err).__name__ in USER_ERRORS or str(err).startswith("config error:"):
            print(f"error: {err}" if not str(err).startswith("config error:") else str(err),
                  file=sys.stderr)
            sys.exit(2)
        raise
    log.info("\n%s", format_summary(result))
    if result.stop_signal:
        # Preempted: checkpointed and stopped early. Exit like a signalled process would.
        sys.exit(128 + result.stop_signal)
    return result.val_loss if result.val_loss is not None else result.final_loss
