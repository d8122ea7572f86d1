"""Sweep report: a Markdown table of every job of a Hydra multirun plus two plots.

    python -m vlm_sweep.report outputs/<experiment>/multirun/<date>/<time>
    python -m vlm_sweep.report <mlflow experiment name or id> [--tracking-uri URI]

``write_report`` is what the end-of-sweep callback calls; ``render_table`` gives the
same table for the terminal. With an MLflow parent run, the report is also logged to
it (artifact path ``report/``) so it sits next to the runs it describes.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, List, Optional, Union

from vlm_sweep.report.markdown import render_report, table_rows
from vlm_sweep.report.markdown import render_table as _render_table
from vlm_sweep.report.model import Job, Sweep, best_job
from vlm_sweep.report.sources import ReportError, load_sweep

__all__ = ["Job", "ReportError", "Sweep", "best_job", "load_sweep", "log_to_parent_run",
           "render_table", "table_rows", "write_report"]

log = logging.getLogger(__name__)

Source = Union[str, Path, Sweep]
LOSS_PNG = "loss_curves.png"
METRIC_PNG = "metric_vs_hparams.png"


def _sweep(source: Source, tracking_uri: Optional[str], parent_run_id: Optional[str]) -> Sweep:
    return source if isinstance(source, Sweep) else load_sweep(source, tracking_uri, parent_run_id)


def render_table(source: Source, metric: str = "val_loss", mode: str = "min",
                 tracking_uri: Optional[str] = None, parent_run_id: Optional[str] = None) -> str:
    """The job table (aligned Markdown, best row bold + ★) for printing."""
    return _render_table(_sweep(source, tracking_uri, parent_run_id), metric, mode)


def log_to_parent_run(sweep: Sweep, files: List[Path]) -> bool:
    """Attach the report to the sweep's MLflow parent run; a tracking hiccup only warns."""
    if not sweep.parent_run_id or not sweep.tracking_uri:
        return False
    try:
        from vlm_sweep.report.sources import mlflow_client

        client = mlflow_client(sweep.tracking_uri)
        for path in files:
            client.log_artifact(sweep.parent_run_id, str(path), artifact_path="report")
    except Exception as err:  # the report on disk is what matters; MLflow is a copy
        log.warning("could not log the report to MLflow run %s: %s", sweep.parent_run_id, err)
        return False
    return True


def write_report(source: Source, metric: str = "val_loss", mode: str = "min",
                 output_dir: Optional[Union[str, Path]] = None, tracking_uri: Optional[str] = None,
                 parent_run_id: Optional[str] = None) -> Path:
    """Write report.md + PNGs and return report.md's path.

    ``source``: a sweep dir, an MLflow experiment name/id, or an already loaded ``Sweep``.
    Output goes to ``output_dir``, else the sweep dir itself, else ``./report_<parent run id>``.
    """
    from vlm_sweep.report.plots import plot_loss_curves, plot_metric_vs_hparams

    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    sweep = _sweep(source, tracking_uri, parent_run_id)
    if output_dir is None:
        output_dir = f"report_{sweep.parent_run_id}" if sweep.from_mlflow else sweep.sweep_dir
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)

    plots: Dict[str, str] = {}
    notes: List[str] = []
    made = plot_loss_curves(sweep, out / LOSS_PNG, metric, mode)
    if made:
        plots["Loss curves"] = LOSS_PNG
    else:
        notes.append("No loss curves: no job logged a loss.")
    made_metric = plot_metric_vs_hparams(sweep, out / METRIC_PNG, metric, mode)
    if made_metric:
        plots[f"{metric} by swept hyperparameter"] = METRIC_PNG
    else:
        notes.append(f"No {metric}-by-hyperparameter plot: "
                     + ("no override was swept." if not sweep.varying_keys()
                        else f"no finished job reports {metric}."))
    for name, path in ((LOSS_PNG, made), (METRIC_PNG, made_metric)):
        if path is None:
            (out / name).unlink(missing_ok=True)  # a stale plot from an earlier report would mislead

    report = out / "report.md"
    report.write_text(render_report(sweep, metric, mode, plots, notes))
    log_to_parent_run(sweep, [report, *(out / name for name in plots.values())])
    return report
