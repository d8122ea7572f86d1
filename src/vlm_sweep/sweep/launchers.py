"""What vlm_sweep's submitit launchers (local and SLURM) add: wait for every job, isolate failures.

Hydra instantiates launchers only from the ``hydra_plugins`` package: the launcher classes
themselves are ``hydra_plugins.vlm_sweep_plugins.LocalLauncher|SlurmLauncher``, built from
the plugin's launchers and the mixins here.

hydra-submitit-launcher collects results with ``[j.results()[0] for j in jobs]``: the first
job that died (cancelled, OOM-killed, node failure) raises there, the sweep command
returns while the others still run, and no report is written. These subclasses wait
for all jobs, record a dead job as FAILED in its ``job_status.json`` (message + submitit
log path) and hand Hydra a completed result, so the sweep callback reports every
failure and exits non-zero once all jobs are done. Training failures never get here:
``cli.run_job`` records them itself. Preemption keeps the plugin's ``checkpoint``:
the job is requeued with the same arguments and resumes from its own LATEST.

A sweep that cannot be submitted (no SLURM client here, sbatch refusing the array) ends
in one line naming sbatch's own error and the way out (``hydra/launcher=local``).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any, List, NoReturn, Optional, Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from omegaconf import OmegaConf

from vlm_sweep.rundir import SWEEP_PARENT
from vlm_sweep.records import job_dirs
from vlm_sweep.sweep.job import read_status, write_status
from vlm_sweep.sweep.job import JobStatus as VlmJobStatus

log = logging.getLogger(__name__)


class WaitForAll:
    """Mixin over the plugin's launchers: same executor set-up, fault-isolated collection."""

    def _executor(self) -> Any:
        import submitit

        params = dict(self.params)
        init_params = {"folder": params.pop("submitit_folder")}
        if "max_num_timeout" in params:
            init_params[f"{self._EXECUTOR}_max_num_timeout"] = params.pop("max_num_timeout")
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **init_params)
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in base else f"{self._EXECUTOR}_{k}": v for k, v in params.items()})
        return executor

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None and len(job_overrides) > 0
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log.info("submitit '%s' sweep output dir: %s", self._EXECUTOR, sweep_dir)
        indices = list(range(initial_job_idx, initial_job_idx + len(job_overrides)))
        job_params: List[Any] = []
        for idx, overrides in zip(indices, job_overrides):
            log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
            job_params.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()))
        printed = io.StringIO()  # submitit prints sbatch's stderr on failure: our one line quotes it
        try:
            with contextlib.redirect_stderr(printed):
                jobs = self._executor().map_array(self, *zip(*job_params))
        except Exception as err:
            problem = self.submission_problem(err)
            if problem is None:
                sys.stderr.write(printed.getvalue())
                raise
            self._abort(sweep_dir, problem)
        sys.stderr.write(printed.getvalue())
        results: List[JobReturn] = []
        for idx, overrides, job in zip(indices, job_overrides, jobs):
            try:
                results.append(job.results()[0])
            except Exception as err:  # the job process died without returning
                log.error("job #%d (%s) died: %s", idx, job.job_id, str(err).splitlines()[0])
                job_dir = self._job_dir(sweep_dir, idx)
                self._record_death(job_dir, idx, list(overrides), err, job)
                results.append(JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED,
                                         _return_value=math.nan, working_dir=str(job_dir)))
        return results

    def submission_problem(self, err: Exception) -> Optional[str]:
        """The one-line message for a sweep that could not be submitted, or None (not a submission error)."""
        return None

    def _abort(self, sweep_dir: Path, message: str) -> NoReturn:
        """Nothing was submitted: close the sweep's MLflow parent run as FAILED, say why, exit 2."""
        parent_file = Path(sweep_dir).resolve() / SWEEP_PARENT
        if parent_file.exists() and self.config is not None:
            from vlm_sweep.sweep.callbacks import SweepCallback

            SweepCallback._close_parent(self.config, json.loads(parent_file.read_text()), "FAILED")
        print(message, file=sys.stderr, flush=True)
        sys.exit(2)

    @staticmethod
    def _job_dir(sweep_dir: Path, idx: int) -> Path:
        """The job's dir: ``<idx>`` or ``<idx>_<suffix>`` (hparams_search=optuna adds the start time)."""
        found = [d for d in job_dirs(sweep_dir) if d.name.split("_")[0] == str(idx)]
        return found[-1] if found else sweep_dir / str(idx)

    @staticmethod
    def _record_death(job_dir: Path, idx: int, overrides: List[str], err: Exception, job: Any) -> None:
        job_dir.mkdir(parents=True, exist_ok=True)
        previous = read_status(job_dir) or {}
        if previous.get("status") == "FINISHED":
            return
        from submitit.core.utils import UncompletedJobError

        if isinstance(err, UncompletedJobError):  # submitit's message is a result-file path
            why = f"no result (killed, out of memory or node failure?); state {_state(job)}"
        else:
            why = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        write_status(job_dir, VlmJobStatus(
            status="FAILED", job_num=idx, override_dirname=previous.get("override_dirname", ",".join(overrides)),
            overrides=overrides, log_path=str(job.paths.stderr), run_dir=str(job_dir),
            error=f"job {job.job_id} died: {why}", slurm_job_id=str(job.job_id),
            mlflow_run_id=previous.get("mlflow_run_id")))


def _state(job: Any) -> str:
    try:
        return str(job.state)
    except Exception:  # the scheduler cannot say
        return "unknown"


class SlurmSubmission:
    """Mixin for the SLURM launcher: a sweep that could not be submitted is one line, not a traceback."""

    def submission_problem(self, err: Exception) -> Optional[str]:
        """Any failure before the array is queued: no SLURM client, sbatch's error, bad parameters."""
        local = "or run the jobs on this machine with hydra/launcher=local"
        if isinstance(err, FileNotFoundError) or "Could not detect \"srun\"" in str(err):
            return ("error: SLURM is not reachable from here: sbatch/srun are not on PATH (no SLURM client on "
                    f"this machine); submit the sweep from a SLURM login node, {local}")
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        first = lines[0] if lines else type(err).__name__
        return (f"error: SLURM did not take the sweep: {first}; check that SLURM is reachable from here and "
                f"hydra.launcher.partition/account/qos, {local}")


PLUGINS = "hydra_plugins.vlm_sweep_plugins"


def register_launcher_schemas() -> None:
    """Point ``hydra/launcher=submitit_local|submitit_slurm`` and ``hydra/sweeper=optuna`` at
    vlm_sweep's plugins (``hydra_plugins.vlm_sweep_plugins``).

    Hydra's plugin scan re-executes every ``hydra_plugins`` module, including the plugins'
    config modules that store these names: anything stored before the scan is overwritten.
    So the scan runs first (it runs once per process; Hydra reuses it), then ours are stored,
    keeping the plugins' typed schemas. conf/hydra/launcher/*.yaml and
    conf/hparams_search/optuna.yaml also name the targets explicitly.
    """
    from hydra.core.config_store import ConfigStore
    from hydra.core.plugins import Plugins
    from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf
    from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf, SlurmQueueConf

    Plugins.instance()
    cs = ConfigStore.instance()
    cs.store(group="hydra/launcher", name="submitit_local", provider="vlm_sweep",
             node=LocalQueueConf(_target_=f"{PLUGINS}.LocalLauncher"))
    cs.store(group="hydra/launcher", name="submitit_slurm", provider="vlm_sweep",
             node=SlurmQueueConf(_target_=f"{PLUGINS}.SlurmLauncher", max_num_timeout=3))
    cs.store(group="hydra/sweeper", name="optuna", provider="vlm_sweep",
             node=OptunaSweeperConf(_target_=f"{PLUGINS}.OptunaSweeper"))
