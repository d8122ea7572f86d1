"""Glue between Hydra's job and the recipe: validation, sweep bookkeeping, the closing summary.

In a sweep (``-m``) a failing job never raises: it records FAILED with its message and log
path in ``job_status.json`` (and MLflow), so the other jobs finish and the sweep callback
reports every failure and exits non-zero at the end.
"""

from __future__ import annotations

import json
import logging
import math
import shlex
import signal
import sys
import traceback
from typing import Optional

from omegaconf import DictConfig

log = logging.getLogger("vlm_sweep")

# Errors not (yet) derived from UserError whose message is the whole story.
USER_ERRORS = ("ModelLoadError",)


def format_summary(result, resume_hint: Optional[str] = None) -> str:
    def fmt(v: Optional[float]) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    lines = [
        f"run {result.status} at step {result.step}: loss {fmt(result.first_loss)} -> "
        f"{fmt(result.final_loss)}, val_loss {fmt(result.val_loss)}",
    ]
    evals = {k: v for k, v in sorted(result.metrics.items()) if k.startswith("eval/")}
    if evals:
        lines.append("  " + ", ".join(f"{k} {v:.4f}" for k, v in evals.items()))
    lines += [
        f"  run dir:    {result.run_dir}",
        f"  checkpoint: {result.checkpoint or 'none'}",
    ]
    if result.mlflow_run_id:
        lines.append(f"  mlflow:     run {result.mlflow_run_id} in {result.mlflow_uri}")
    if resume_hint:
        lines.append(f"  resume:     {resume_hint}")
    return "\n".join(lines)


def resume_command(ctx) -> str:
    """The exact command that continues this run (a plain run's dir is timestamped: pin it)."""
    args = " ".join(shlex.quote(a) for a in ctx.overrides if not a.startswith("hydra.run.dir="))
    if ctx.is_multirun:
        return f"the same -m command with hydra.sweep.dir={shlex.quote(str(ctx.sweep_dir))}"
    return f"python launch.py {args} hydra.run.dir={shlex.quote(str(ctx.run_dir))}".replace("  ", " ")


def _is_user_error(err: BaseException) -> bool:
    """Print one line (no traceback) for errors the user fixes by changing a config, record or file."""
    from vlm_sweep.errors import is_user_error

    return is_user_error(err) or type(err).__name__ in USER_ERRORS


def _first_line(err: BaseException) -> str:
    """The error's message in one line (for an error re-raised from a DataLoader worker: the original one)."""
    text = str(err)
    if not text:
        return type(err).__name__
    lines = [line for line in text.splitlines() if line.strip()]
    if lines[0].startswith("Caught ") and "Original Traceback" in text:
        original = lines[-1]
        prefix = f"{type(err).__name__}: "
        return original.split(prefix, 1)[1] if prefix in original else original
    return lines[0]


def _log_to_files(message: str) -> None:
    """Record an error in launch.log without printing it to the console a second time."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def run_job(cfg: DictConfig) -> Optional[float]:
    """Run one Hydra job; returns the objective (``objective_metric``) for sweepers."""
    from vlm_sweep.config.validate import world_size
    from vlm_sweep.sweep.job import (JobStatus, export_distributed_env, is_main_process, job_context,
                                     read_status, throughput_summary, write_status)

    export_distributed_env()
    ctx = job_context()
    main = is_main_process()
    previous = read_status(ctx.run_dir)
    if ctx.is_multirun and previous and previous["status"] == "FINISHED" \
            and previous["overrides"] == ctx.overrides:
        log.info("job %d (%s) already FINISHED: skipped", ctx.job_num, ctx.override_dirname)
        return previous.get("objective")

    def status(state: str, **extra) -> JobStatus:
        return JobStatus(status=state, job_num=ctx.job_num, override_dirname=ctx.override_dirname,
                         overrides=ctx.overrides, log_path=str(ctx.log_path), run_dir=str(ctx.run_dir),
                         slurm_job_id=ctx.slurm_job_id, **extra)

    started = {"yes": False}

    def on_start() -> None:
        started["yes"] = True
        if main:
            write_status(ctx.run_dir, status("RUNNING"))

    parent = ctx.parent_run
    run_info = {
        "parent_run_id": parent["run_id"] if parent else None,
        "run_name": ctx.override_dirname or None,
        "tags": {"vlm_sweep.job_num": ctx.job_num, "vlm_sweep.sweep_dir": ctx.sweep_dir,
                 "vlm_sweep.slurm_job_id": ctx.slurm_job_id},
    }
    try:
        from vlm_sweep.config.validate import validate_config

        validate_config(cfg)  # before anything heavy is imported
        from vlm_sweep.console import setup_rank_logging, silence_known_noise

        setup_rank_logging()  # RANK is known: other ranks log warnings and errors only
        silence_known_noise()
        from vlm_sweep.train import run

        result = run(cfg, ctx.run_dir, run_info=run_info, on_start=on_start)
    except KeyboardInterrupt:
        if main:
            write_status(ctx.run_dir, status("KILLED", error="stopped by Ctrl-C before a checkpoint; "
                                             "the rerun resumes from the previous one"))
        print(f"stopped by Ctrl-C; resume with: {resume_command(ctx)}", file=sys.stderr)
        sys.exit(130)
    except Exception as err:
        message = _first_line(err)
        # A start refused before it began (e.g. a checkpoint that does not fit this config)
        # leaves an existing run's records exactly as they were.
        if main and (started["yes"] or previous is None):
            tracking = ctx.run_dir / "tracking.json"
            run_id = json.loads(tracking.read_text())["run_id"] if tracking.exists() else None
            write_status(ctx.run_dir, status("FAILED", error=f"{type(err).__name__}: {message}",
                                             mlflow_run_id=run_id,
                                             **(throughput_summary(ctx.run_dir, world_size()) if started["yes"] else {})))
        if _is_user_error(err):
            print(message if message.startswith("config error:") else f"error: {message}", file=sys.stderr)
            _log_to_files(message)  # the console already has the line
            if not ctx.is_multirun:
                sys.exit(2)
        else:
            log.error("job failed:\n%s", traceback.format_exc())
            if not ctx.is_multirun:
                raise
        return math.nan  # sweepers (Optuna) record a failed trial; the callback reports it

    objective = None
    if cfg.objective_metric == "loss":
        objective = result.final_loss
    else:
        objective = result.metrics.get(cfg.objective_metric)
    state, error, hint = result.status, None, None
    if result.stop_signal:
        name = signal.Signals(result.stop_signal).name
        state = "PREEMPTED" if result.stop_signal == signal.SIGUSR2 else "KILLED"
        hint = resume_command(ctx)
        error = f"stopped by {name} at step {result.step}; resume with: {hint}"
    if main:
        write_status(ctx.run_dir, status(
            state, error=error, step=result.step, final_loss=result.final_loss, val_loss=result.val_loss,
            metrics={k: v for k, v in result.metrics.items() if k.startswith("eval/")},
            objective=objective, mlflow_run_id=result.mlflow_run_id,
            **throughput_summary(ctx.run_dir, world_size())))
        log.info("\n%s", format_summary(result, hint))
    if result.stop_signal == signal.SIGINT:
        sys.exit(130)  # Ctrl-C: checkpointed; one line above, no traceback
    if result.stop_signal:
        # Preempted: checkpointed. Hand the signal to whoever handled it before us: submitit
        # requeues the job; a plain process ends as if killed by it.
        signal.raise_signal(result.stop_signal)
    return objective
