"""report.md and the terminal table: one row per job, the best one marked.

The table is aligned plain Markdown so the same text reads well in a terminal and
renders in MLflow's artifact viewer or on GitHub.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

from vlm_sweep.report.model import Job, Sweep, best_job

BEST_MARK = "★"
STATUS_ORDER = ["FINISHED", "RUNNING", "PREEMPTED", "KILLED", "FAILED", "UNKNOWN"]
MISSING = "n/a"
ERROR_CHARS = 80


def _num(value: Optional[float], fmt: str = ".4f") -> str:
    return MISSING if value is None else format(value, fmt)


def _percent(value: Optional[float]) -> str:
    return MISSING if value is None else f"{100 * value:.1f}%"


def _hours(value: Optional[float]) -> str:
    """Two decimals from one hour up; two significant digits below (a CPU demo's 0.00042)."""
    if value is None:
        return MISSING
    return f"{value:,.2f}" if value >= 1 else f"{value:.2g}"


def _cell(text: str) -> str:
    """Table-safe: one line, no column breaks."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _short_path(path: str, sweep_dir: Optional[str]) -> str:
    """A log path relative to the sweep dir (``2/launch.log``) keeps the table narrow."""
    if sweep_dir:
        try:
            return str(Path(path).resolve().relative_to(Path(sweep_dir).resolve()))
        except ValueError:
            pass
    return path


def short_error(job: Job, sweep_dir: Optional[str] = None) -> str:
    """What went wrong in a line, with where to read more; empty for a finished job."""
    if job.status == "FINISHED":
        return ""
    error = (job.error or "").strip().splitlines()[0] if (job.error or "").strip() else ""
    if len(error) > ERROR_CHARS:
        error = error[:ERROR_CHARS - 1] + "…"
    error = error.replace("`", "'")
    log = f"log: `{_short_path(job.log_path, sweep_dir)}`" if job.log_path else "no log"
    return f"{error} ({log})" if error else log


def table_rows(sweep: Sweep, metric: str = "val_loss", mode: str = "min") -> List[List[str]]:
    """Header row then one row per job, cells as strings (best job bold and starred)."""
    keys, evals = sweep.varying_keys(), sweep.eval_metrics()
    show_errors = any(job.status != "FINISHED" for job in sweep.jobs)
    # The full override dirname goes last but one: long, and the varying keys already say it.
    header = (["job", *keys, "status", "steps", "final loss", "val_loss", *evals, "precision", "tokens/s",
               "real tokens", "TFLOP/s", "MFU", sweep.hours_label(), "overrides"] + (["error"] if show_errors else []))
    best = best_job(sweep.jobs, metric, mode)
    rows = [header]
    for job in sweep.jobs:
        cells = [str(job.job_num), *(job.overrides.get(k, MISSING) for k in keys), job.status,
                 MISSING if job.step is None else str(job.step), _num(job.final_loss),
                 _num(job.val_loss), *(_num(job.metrics.get(k)) for k in evals),
                 job.compute_precision or MISSING, _num(job.tokens_per_s, ",.0f"),
                 _percent(job.packing_efficiency), _num(job.tflops, ".1f"), _percent(job.mfu),
                 _hours(job.device_hours),
                 f"`{job.override_dirname}`" if job.override_dirname else MISSING]
        cells += [short_error(job, sweep.sweep_dir)] if show_errors else []
        cells = [_cell(c) for c in cells]
        if job is best:
            cells[0] = f"{BEST_MARK} {cells[0]}"
            cells = [f"**{c}**" if c else c for c in cells]
        rows.append(cells)
    return rows


def render_table(sweep: Sweep, metric: str = "val_loss", mode: str = "min") -> str:
    """The job table as aligned Markdown (prints readably in a terminal)."""
    rows = table_rows(sweep, metric, mode)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def best_line(sweep: Sweep, metric: str, mode: str) -> str:
    """Which job won and by how much, or why none is marked."""
    best = best_job(sweep.jobs, metric, mode)
    if best is None:
        known = ["loss", "val_loss", "tokens_per_s", "packing_efficiency", "tflops", "mfu", "device_hours",
                 *sweep.eval_metrics()]
        return (f"no finished job reports `{metric}`: no best job marked "
                f"(metrics available: {', '.join(known)})")
    direction = "lowest" if mode == "min" else "highest"
    return (f"{BEST_MARK} job {best.job_num} `{sweep.short_label(best)}` with {metric} = "
            f"{best.value(metric):.4f} ({direction} among finished jobs)")


def render_report(sweep: Sweep, metric: str, mode: str, plots: Dict[str, str],
                  notes: Optional[List[str]] = None) -> str:
    """The whole report.md: header, table, linked plots, failures in full."""
    order = {status: i for i, status in enumerate(STATUS_ORDER)}
    counts = ", ".join(f"{n} {status.lower()}" for status, n in
                       sorted(sweep.status_counts().items(), key=lambda kv: (order.get(kv[0], 99), kv[0])))
    lines = [f"# Sweep report: {sweep.title}", "",
             f"- source: {sweep.source}",
             f"- date: {sweep.date}",
             f"- jobs: {len(sweep.jobs)} ({counts})",
             f"- ranked by: `{metric}` ({mode}) — {best_line(sweep, metric, mode)}"]
    fixed = sweep.fixed_overrides()
    if fixed:
        lines.append("- same in every job: " + ", ".join(f"`{k}={v}`" for k, v in fixed.items()))
    if sweep.parent_run_id:
        lines.append(f"- MLflow parent run: `{sweep.parent_run_id}`")
    lines.append(f"- throughput: means over each job's logged steps; real tokens = share of the positions run "
                 f"that are not padding (`dataset.packing` raises it); TFLOP/s and MFU per device, vision "
                 f"tower included (MFU n/a where the device peak is unknown); {sweep.hours_label()} = "
                 f"training wall time x processes")
    lines += ["", render_table(sweep, metric, mode), ""]
    for title, filename in plots.items():
        lines += [f"## {title}", "", f"![{title}]({filename})", ""]
    for note in notes or []:
        lines += [f"_{note}_", ""]
    failed = [job for job in sweep.jobs if job.status != "FINISHED"]
    if failed:
        lines += ["## Jobs that did not finish", ""]
        for job in failed:
            lines.append(f"- job {job.job_num} `{job.label}`: {job.status}"
                         + (f" — {' '.join(job.error.split())}" if job.error else "")
                         + (f"\n  - log: `{job.log_path}`" if job.log_path else ""))
        lines.append("")
    return "\n".join(lines)
