"""Hydra callback that gives a sweep its MLflow parent run, its report and its exit code."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from vlm_sweep.rundir import SWEEP_PARENT
from vlm_sweep.records import job_dirs
from vlm_sweep.sweep.job import read_status

log = logging.getLogger(__name__)


def job_statuses(sweep_dir: Path) -> List[Dict[str, Any]]:
    """Each job's status; a job that left no status file is UNKNOWN (it never got to write one)."""
    out = []
    for path in job_dirs(sweep_dir):
        status = read_status(path) or {"status": "UNKNOWN", "job_num": int(path.name.split("_")[0]),
                                       "run_dir": str(path),
                                       "error": "the job left no job_status.json", "log_path": str(path)}
        out.append(status)
    return out


def _tracking_uri(config: DictConfig) -> Optional[str]:
    """The store to connect to (credentials and all); never stored or printed as is."""
    if config.tracking.backend != "mlflow":
        return None
    from vlm_sweep.tracking import default_tracking_uri

    return config.tracking.uri or default_tracking_uri(config.paths.output_root)


class SweepCallback(Callback):
    """on_multirun_start: create (or reuse) the sweep's parent MLflow run.
    on_multirun_end: write the report, close the parent run, list failures, exit non-zero on any."""

    def __init__(self, metric: str = "val_loss", mode: str = "min") -> None:
        self.metric = metric
        self.mode = mode

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if config.tracking.backend != "mlflow":
            return
        from vlm_sweep.tracking import RetryingClient, TrackingError, check_tracking, experiment_id, redact_uri

        try:  # one line and exit 2 before any job starts, not the same failure in every job
            check_tracking(config.tracking, config.paths.output_root)
        except TrackingError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        uri = _tracking_uri(config)
        client = RetryingClient(uri)
        parent_file = sweep_dir / SWEEP_PARENT
        if parent_file.exists():  # the same sweep run again: continue its parent run
            parent = json.loads(parent_file.read_text())
            client.update_run(parent["run_id"], status="RUNNING")
            return
        exp_id = experiment_id(client, config.tracking.experiment_name, uri)
        run = client.create_run(exp_id, run_name=f"sweep {sweep_dir.parent.name}/{sweep_dir.name}",
                                tags={"vlm_sweep.sweep_dir": str(sweep_dir), "vlm_sweep.role": "sweep"})
        # The URI as stored and printed has its credentials masked; the real one only connects.
        shown = redact_uri(uri)
        parent_file.write_text(json.dumps({"run_id": run.info.run_id, "uri": shown,
                                           "experiment_id": exp_id}) + "\n")
        log.info("sweep MLflow parent run %s in %s", run.info.run_id, shown)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        statuses = job_statuses(sweep_dir)
        failed = [s for s in statuses if s["status"] != "FINISHED"]
        try:
            from vlm_sweep.report import load_sweep, render_table, write_report

            # The real URI (mlflow_parent.json holds the masked one) to attach the report to the parent run.
            sweep = load_sweep(sweep_dir, tracking_uri=_tracking_uri(config))
            report = write_report(sweep, metric=self.metric, mode=self.mode)
            print(render_table(sweep, metric=self.metric, mode=self.mode))
            print(f"sweep report: {report}")
        except Exception as err:  # a report problem must not hide the jobs' own outcome
            from vlm_sweep.tracking import redact_uri

            log.error("could not write the sweep report: %s", redact_uri(str(err)))
        parent_file = sweep_dir / SWEEP_PARENT
        if parent_file.exists():
            self._close_parent(config, json.loads(parent_file.read_text()), "FAILED" if failed else "FINISHED")
        if failed:
            lines = [f"{len(failed)} of {len(statuses)} jobs did not finish:"]
            for s in failed:
                lines.append(f"  job {s.get('job_num')} ({s.get('override_dirname', '')}) {s['status']}: "
                             f"{s.get('error') or 'no error message'} -- log: {s.get('log_path')}")
            print("\n".join(lines), file=sys.stderr)
            sys.exit(1)

    @staticmethod
    def _close_parent(config: DictConfig, parent: Dict[str, Any], status: str) -> None:
        """End the parent run; a store that does not answer costs a warning, not the sweep's outcome."""
        from vlm_sweep.tracking import RetryingClient, redact_uri
        from vlm_sweep.tracking.store import one_line

        uri = _tracking_uri(config)  # the file holds the masked URI; connect with the configured one
        if uri is None:
            return
        try:
            RetryingClient(uri).set_terminated(parent["run_id"], status=status)
        except Exception as err:
            log.warning("could not close the sweep's MLflow parent run %s in %s: %s", parent["run_id"],
                        redact_uri(uri), one_line(err))
