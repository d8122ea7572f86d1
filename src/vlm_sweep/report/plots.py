"""The two sweep plots: all loss curves on one figure, the ranking metric per hyperparameter.

matplotlib is imported inside the functions (Agg backend) so importing the report
module, or a training job, never pays for it or needs a display.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from vlm_sweep.report.model import BASE_METRICS, Job, Sweep, best_job

LEGEND_WIDTH = 42  # characters per legend line: long override dirnames wrap at commas


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def job_colors(jobs: Sequence[Job]) -> Dict[int, Any]:
    """A stable color per job number, shared by both figures."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if len(jobs) <= 10 else "tab20"]
    n = cmap.N if len(jobs) <= 20 else len(jobs)
    return {job.job_num: cmap(i % cmap.N) if len(jobs) <= 20 else matplotlib.colormaps["viridis"](i / n)
            for i, job in enumerate(jobs)}


def _legend_label(sweep: Sweep, job: Job, best: Optional[Job]) -> str:
    """``★ 3: lr=.., peft=..`` with the overrides every job shares left out (the title has them)."""
    text = f"{'★ ' if job is best else ''}{job.job_num}: {sweep.short_label(job).replace(',', ', ')}"
    if job.status != "FINISHED":
        text += f" [{job.status}]"
    return textwrap.fill(text, LEGEND_WIDTH, subsequent_indent="   ")


def plot_loss_curves(sweep: Sweep, path: Path, metric: str = "val_loss", mode: str = "min") -> Optional[Path]:
    """Training loss of every job (val_loss dashed with markers); None if no job logged a loss."""
    jobs = [job for job in sweep.jobs if job.loss_curve or job.val_curve]
    if not jobs:
        return None
    plt = _pyplot()
    from matplotlib.lines import Line2D

    colors, best = job_colors(sweep.jobs), best_job(sweep.jobs, metric, mode)
    fixed = sweep.fixed_overrides()
    labels = {job.job_num: _legend_label(sweep, job, best) for job in jobs}
    legend_lines = sum(label.count("\n") + 1.3 for label in labels.values())
    fig, ax = plt.subplots(figsize=(11, max(5.5, 0.16 * legend_lines + 1.2)))  # room for the legend
    values: List[float] = []
    for job in jobs:
        color, width = colors[job.job_num], 2.6 if job is best else 1.5
        if job.loss_curve:
            steps, losses = zip(*job.loss_curve)
            ax.plot(steps, losses, color=color, lw=width, alpha=0.9, label=labels[job.job_num])
            values += losses
        if job.val_curve:
            steps, vals = zip(*job.val_curve)
            ax.plot(steps, vals, color=color, lw=width * 0.8, ls="--", marker="o", ms=5,
                    label=None if job.loss_curve else labels[job.job_num])
            values += vals
    positive = [v for v in values if v > 0]
    if positive and len(positive) == len(values) and max(positive) / min(positive) > 20:
        ax.set_yscale("log")
    title = [f"Loss curves: {sweep.title} ({len(jobs)} job{'' if len(jobs) == 1 else 's'})"]
    if fixed:  # wrapped and capped: a long list of fixed overrides must not widen the figure
        shared = "same in every job: " + ", ".join(f"{k}={v}" for k, v in fixed.items())
        title += textwrap.wrap(textwrap.shorten(shared, 300, placeholder=" …"), 110)
    ax.set(xlabel="step", ylabel="loss")
    ax.set_title("\n".join(title), fontsize=10)
    ax.grid(True, alpha=0.3)
    if any(job.val_curve for job in jobs):  # a style key; drawn first, the job legend is the main one
        styles = [Line2D([], [], color="0.3", lw=1.5, label="train loss"),
                  Line2D([], [], color="0.3", lw=1.2, ls="--", marker="o", ms=5, label="val_loss")]
        ax.add_artist(ax.legend(handles=styles, loc="upper right", fontsize=9))
    # Outside the axes on the right: long override lists never cover a curve.
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), title="job: overrides",
              fontsize=8 if len(jobs) > 8 else 9, frameon=False, alignment="left")
    plotted = {job.job_num for job in jobs}
    silent = [str(job.job_num) for job in sweep.jobs if job.job_num not in plotted]
    if silent:
        fig.text(0.01, 0.01, f"no loss logged by job(s) {', '.join(silent)}", fontsize=8, color="0.4")
    return _save(fig, path)


def _numeric(values: Sequence[Optional[str]]) -> Optional[List[float]]:
    """Floats if every value parses as a finite number, else None (categorical)."""
    try:
        out = [float(v) for v in values]  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return out if all(math.isfinite(v) for v in out) else None


def _spread(xs: Sequence[float], width: float) -> List[float]:
    """Offsets that fan out points sharing an x, so no marker hides another."""
    seen: Dict[float, int] = {}
    counts = {x: xs.count(x) for x in xs}
    out = []
    for x in xs:
        i, n = seen.get(x, 0), counts[x]
        seen[x] = i + 1
        out.append(0.0 if n == 1 else width * (i / (n - 1) - 0.5))
    return out


def _draw_key(ax: Any, key: str, points: List[Tuple[Job, float]], colors: Dict[int, Any],
              best: Optional[Job]) -> None:
    raw = [job.overrides.get(key) for job, _ in points]
    numbers = _numeric(raw)
    if numbers is not None:
        log_x = min(numbers) > 0 and max(numbers) / min(numbers) > 10
        xs = numbers
        if log_x:
            ax.set_xscale("log")
            xs = [x * 10 ** d for x, d in zip(numbers, _spread(numbers, 0.08))]
        else:
            span = (max(numbers) - min(numbers)) or 1.0
            xs = [x + d for x, d in zip(numbers, _spread(numbers, 0.04 * span))]
        ticks = sorted(set(numbers))
        if len(ticks) <= 8:
            labels = {float(v): str(v) for v in raw}
            ax.set_xticks(ticks, [labels[t] for t in ticks])
            ax.minorticks_off()
        if len(ticks) == 1 and ticks[0] > 0:  # one value: matplotlib's default range is tiny
            ax.set_xlim(ticks[0] / 2, ticks[0] * 2)
        ax.set_xlabel(key + (" (log scale)" if log_x else ""))
    else:
        names = ["n/a" if v is None else str(v) for v in raw]  # a job may lack an override
        categories = sorted(set(names))
        base = [float(categories.index(name)) for name in names]
        xs = [x + d for x, d in zip(base, _spread(base, 0.3))]
        long_names = max(map(len, categories)) > 8
        ax.set_xticks(range(len(categories)), categories, rotation=20 if long_names else 0,
                      ha="right" if long_names else "center", rotation_mode="anchor")
        ax.set_xlim(-0.6, len(categories) - 0.4)
        ax.set_xlabel(key)
    for (job, y), x in zip(points, xs):
        star = job is best
        ax.scatter([x], [y], s=220 if star else 60, marker="*" if star else "o", zorder=3,
                   color=colors[job.job_num], edgecolors="black" if star else "none")
        ax.annotate(str(job.job_num), (x, y), textcoords="offset points", xytext=(6, 5), fontsize=8,
                    zorder=4, bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.7})
    ax.margins(x=0.12, y=0.15)
    ax.set_title(key)
    ax.grid(True, alpha=0.3)


def plot_metric_vs_hparams(sweep: Sweep, path: Path, metric: str = "val_loss",
                           mode: str = "min") -> Optional[Path]:
    """``metric`` of each finished job against each swept key; None if nothing to plot."""
    keys = sweep.varying_keys()
    points = [(job, job.value(metric)) for job in sweep.jobs
              if job.status == "FINISHED" and job.value(metric) is not None]
    if not keys or not points:
        return None
    plt = _pyplot()
    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols + 0.6, 3.9 * nrows + 0.6),
                             squeeze=False, sharey=True)
    colors, best = job_colors(sweep.jobs), best_job(sweep.jobs, metric, mode)
    for ax, key in zip(axes.flat, keys):
        _draw_key(ax, key, points, colors, best)  # type: ignore[arg-type]
    for ax in axes.flat[len(keys):]:
        ax.set_visible(False)
    label = "final loss" if BASE_METRICS.get(metric) == "final_loss" else metric
    for row in axes:
        row[0].set_ylabel(label)
    better = "lower" if mode == "min" else "higher"
    fig.suptitle(f"{label} by swept hyperparameter\n({better} is better; ★ = best job; numbers = job)",
                 fontsize=11)
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
