"""vlm_sweep's Hydra plugins: Hydra instantiates launchers and sweepers only from ``hydra_plugins.*``.

* ``LocalLauncher`` / ``SlurmLauncher``: hydra-submitit-launcher's, waiting for every job and
  recording dead ones (vlm_sweep.sweep.launchers); SLURM submission failures are one line.
* ``OptunaSweeper``: hydra-optuna-sweeper's, continuing a stored study with new trials and
  trial-numbered jobs (vlm_sweep.sweep.optuna_sweeper, imported when a sweep starts: it imports optuna).

Hydra's plugin scan imports this module at every start: keep it light (no torch, no optuna).
"""

from typing import Any

from hydra_plugins.hydra_optuna_sweeper import optuna_sweeper as _optuna
from hydra_plugins.hydra_submitit_launcher import submitit_launcher as _submitit

from vlm_sweep.sweep.launchers import SlurmSubmission, WaitForAll


class LocalLauncher(WaitForAll, _submitit.LocalLauncher):
    """submitit's local executor: jobs run as parallel processes on this machine."""


class SlurmLauncher(SlurmSubmission, WaitForAll, _submitit.SlurmLauncher):
    """submitit on SLURM: a sweep is one job array."""


class OptunaSweeper(_optuna.OptunaSweeper):
    """hydra-optuna-sweeper, continuing a stored study with new trials (same config schema)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        from vlm_sweep.sweep.optuna_sweeper import continuing

        self.sweeper = continuing(self.sweeper)
