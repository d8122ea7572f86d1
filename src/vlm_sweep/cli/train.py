"""Glue between Hydra's job (launch.py) and the recipe: validation, sweep bookkeeping, the closing summary.

In a sweep (``-m``) a failing job never raises: it records FAILED with its message and log
path in ``job_status.json`` (and MLflow), so the other jobs finish and the sweep callback
reports every failure and exits non-zero at the end. A plain run's user error is one line, exit 2.
"""

from __future__ import annotations

import json
import logging
import math
import shlex
import signal
import sys
import traceback
from typing import Any, Callable, Dict, Optional

from omegaconf import DictConfig

from vlm_sweep.cli.user_errors import USER_ERROR_EXIT, first_line, is_cli_user_error, user_error_line
from vlm_sweep.rundir import RunDir

log = logging.getLogger("vlm_sweep")


def resume_command(ctx: Any) -> str:
    """The exact command that continues this run (a plain run's dir is timestamped: pin it)."""
    args = " ".join(shlex.quote(a) for a in ctx.overrides if not a.startswith("hydra.run.dir="))
    if ctx.is_multirun:
        return f"the same -m command with hydra.sweep.dir={shlex.quote(str(ctx.sweep_dir))}"
    return f"python launch.py {args} hydra.run.dir={shlex.quote(str(ctx.run_dir))}".replace("  ", " ")


def format_summary(result: Any, resume_hint: Optional[str] = None) -> str:
    """The run's closing summary (``console.format_summary``), plus how to resume a stopped run."""
    from vlm_sweep.console import format_summary as summary

    return summary(result) + (f"\n  resume:     {resume_hint}" if resume_hint else "")


def _run_info(ctx: Any) -> Dict[str, Any]:
    """What the tracker needs to nest this job under its sweep's parent run."""
    parent = ctx.parent_run
    return {
        "parent_run_id": parent["run_id"] if parent else None,
        "run_name": ctx.override_dirname or None,
        "tags": {"vlm_sweep.job_num": ctx.job_num, "vlm_sweep.sweep_dir": ctx.sweep_dir,
                 "vlm_sweep.slurm_job_id": ctx.slurm_job_id},
    }


def _run(cfg: DictConfig, ctx: Any, on_start: Callable[[], None]) -> Any:
    """Validate (before anything heavy is imported), set up the console, train."""
    from vlm_sweep.config.validate import validate_config

    validate_config(cfg)
    from vlm_sweep.console import setup_rank_logging, silence_known_noise

    setup_rank_logging()  # RANK is known: other ranks log warnings and errors only
    silence_known_noise()
    from vlm_sweep.train import run

    return run(cfg, ctx.run_dir, run_info=_run_info(ctx), on_start=on_start)


def _failed(err: Exception, ctx: Any, record: Optional[Callable[..., None]]) -> float:
    """Record FAILED (when this job owns the run's records), then one line or a traceback."""
    message = first_line(err)
    if record is not None:
        tracking = RunDir(ctx.run_dir).tracking
        run_id = json.loads(tracking.read_text())["run_id"] if tracking.exists() else None
        # A user error is its message (the console's line without "error: "); a bug keeps its exception type.
        error = message if is_cli_user_error(err) else f"{type(err).__name__}: {message}"
        record(error=error, mlflow_run_id=run_id)
    if is_cli_user_error(err):
        from vlm_sweep.console import user_error

        user_error(user_error_line(err))  # the console gets the line once, launch.log too
        if not ctx.is_multirun:
            sys.exit(USER_ERROR_EXIT)
    else:
        log.error("job failed:\n%s", traceback.format_exc())
        if not ctx.is_multirun:
            raise err
    return math.nan  # sweepers (Optuna) record a failed trial; the callback reports it


def _objective(cfg: DictConfig, result: Any) -> Optional[float]:
    """The number a sweeper optimises: the final loss or one of the run's metrics."""
    return result.final_loss if cfg.objective_metric == "loss" else result.metrics.get(cfg.objective_metric)


def run_job(cfg: DictConfig) -> Optional[float]:
    """Run one Hydra job; returns the objective (``objective_metric``) for sweepers."""
    from vlm_sweep.config.validate import world_size
    from vlm_sweep.records import throughput_summary
    from vlm_sweep.sweep.job import (JobStatus, export_distributed_env, is_main_process, job_context,
                                     read_status, write_status)

    export_distributed_env()
    ctx = job_context()
    main = is_main_process()
    previous = read_status(ctx.run_dir)
    if ctx.is_multirun and previous and previous["status"] == "FINISHED" and previous["overrides"] == ctx.overrides:
        log.info("job %d (%s) already FINISHED: skipped", ctx.job_num, ctx.override_dirname)
        return previous.get("objective")

    def status(state: str, **extra: Any) -> JobStatus:
        return JobStatus(status=state, job_num=ctx.job_num, override_dirname=ctx.override_dirname,
                         overrides=ctx.overrides, log_path=str(ctx.log_path), run_dir=str(ctx.run_dir),
                         slurm_job_id=ctx.slurm_job_id, **extra)

    started = {"yes": False}

    def on_start() -> None:
        started["yes"] = True
        if main:
            write_status(ctx.run_dir, status("RUNNING"))

    def record_failure(**extra: Any) -> None:
        throughput = throughput_summary(ctx.run_dir, world_size()) if started["yes"] else {}
        write_status(ctx.run_dir, status("FAILED", **extra, **throughput))

    try:
        result = _run(cfg, ctx, on_start)
    except KeyboardInterrupt:
        if main:
            write_status(ctx.run_dir, status("KILLED", error="stopped by Ctrl-C before a checkpoint; "
                                             "the rerun resumes from the previous one"))
        print(f"stopped by Ctrl-C; resume with: {resume_command(ctx)}", file=sys.stderr)
        sys.exit(130)
    except Exception as err:
        # A start refused before it began (e.g. a checkpoint that does not fit this config)
        # leaves an existing run's records exactly as they were.
        return _failed(err, ctx, record_failure if main and (started["yes"] or previous is None) else None)

    objective = _objective(cfg, result)
    state, error, hint = result.status, None, None
    if result.stop_signal:
        state = "PREEMPTED" if result.stop_signal == signal.SIGUSR2 else "KILLED"
        hint = resume_command(ctx)
        error = f"stopped by {signal.Signals(result.stop_signal).name} at step {result.step}; resume with: {hint}"
    if main:
        write_status(ctx.run_dir, status(
            state, error=error, step=result.step, final_loss=result.final_loss, val_loss=result.val_loss,
            metrics={k: v for k, v in result.metrics.items() if k.startswith("eval/")},
            objective=objective, mlflow_run_id=result.mlflow_run_id, compute_precision=result.compute_precision,
            **throughput_summary(ctx.run_dir, world_size())))
        log.info("\n%s", format_summary(result, hint))
    if result.stop_signal == signal.SIGINT:
        sys.exit(130)  # Ctrl-C: checkpointed; one line above, no traceback
    if result.stop_signal:
        # Preempted: checkpointed. Hand the signal to whoever handled it before us: submitit
        # requeues the job; a plain process ends as if killed by it.
        signal.raise_signal(result.stop_signal)
    return objective
