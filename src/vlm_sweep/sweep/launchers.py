"""submitit launchers (local and SLURM) that wait for every job and isolate failures.

hydra-submitit-launcher collects results with ``[j.results()[0] for j in jobs]``: the first
job that died (cancelled, OOM-killed, node failure) raises there, the sweep command
returns while the others still run, and no report is written. These subclasses wait
for all jobs, record a dead job as FAILED in its ``job_status.json`` (message + submitit
log path) and hand Hydra a completed result, so the sweep callback reports every
failure and exits non-zero once all jobs are done. Training failures never get here:
``cli.run_job`` records them itself. Preemption keeps the plugin's ``checkpoint``:
the job is requeued with the same arguments and resumes from its own LATEST.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, List, Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher import submitit_launcher as plugin
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from omegaconf import OmegaConf

from vlm_sweep.sweep.job import JobStatus as VlmJobStatus
from vlm_sweep.sweep.job import read_status, write_status

log = logging.getLogger(__name__)


class _WaitForAll:
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
        executor = self._executor()
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log.info("submitit '%s' sweep output dir: %s", self._EXECUTOR, sweep_dir)
        indices = list(range(initial_job_idx, initial_job_idx + len(job_overrides)))
        job_params: List[Any] = []
        for idx, overrides in zip(indices, job_overrides):
            log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
            job_params.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()))
        jobs = executor.map_array(self, *zip(*job_params))
        results: List[JobReturn] = []
        for idx, overrides, job in zip(indices, job_overrides, jobs):
            try:
                results.append(job.results()[0])
            except Exception as err:  # the job process died without returning
                log.error("job #%d (%s) died: %s", idx, job.job_id, str(err).splitlines()[0])
                self._record_death(sweep_dir / str(idx), idx, list(overrides), err, job)
                results.append(JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED,
                                         _return_value=math.nan, working_dir=str(sweep_dir / str(idx))))
        return results

    @staticmethod
    def _record_death(job_dir: Path, idx: int, overrides: List[str], err: Exception, job: Any) -> None:
        job_dir.mkdir(parents=True, exist_ok=True)
        previous = read_status(job_dir) or {}
        if previous.get("status") == "FINISHED":
            return
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        write_status(job_dir, VlmJobStatus(
            status="FAILED", job_num=idx, override_dirname=previous.get("override_dirname", ",".join(overrides)),
            overrides=overrides, log_path=str(job.paths.stderr), run_dir=str(job_dir),
            error=f"job {job.job_id} died: {first_line}", slurm_job_id=str(job.job_id),
            mlflow_run_id=previous.get("mlflow_run_id")))


class LocalLauncher(_WaitForAll, plugin.LocalLauncher):
    """submitit's local executor: jobs run as parallel processes on this machine."""


class SlurmLauncher(_WaitForAll, plugin.SlurmLauncher):
    """submitit on SLURM: a sweep is one job array."""


def register_launcher_schemas() -> None:
    """Point ``hydra/launcher=submitit_local|submitit_slurm`` at the launchers above.

    The plugin registers these names when its config module is imported (done at the
    top of this module); storing them again afterwards replaces its targets with ours,
    keeping its typed schema. conf/hydra/launcher/{local,slurm,slurm_gpu}.yaml build on them.
    """
    from hydra.core.config_store import ConfigStore
    from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf, SlurmQueueConf

    cs = ConfigStore.instance()
    cs.store(group="hydra/launcher", name="submitit_local", provider="vlm_sweep",
             node=LocalQueueConf(_target_=f"{__name__}.LocalLauncher"))
    cs.store(group="hydra/launcher", name="submitit_slurm", provider="vlm_sweep",
             node=SlurmQueueConf(_target_=f"{__name__}.SlurmLauncher", max_num_timeout=3))

