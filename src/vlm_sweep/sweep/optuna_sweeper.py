"""The Optuna sweeper, made to continue a study instead of repeating it.

hydra-optuna-sweeper 1.3 builds the sampler once from the config (``seed: ${seed}``) and
numbers jobs from 0 on every invocation. Running the same ``-m hparams_search=optuna``
command again on the same study (``<sweep dir>/optuna.db``) therefore replays the seeded
sampler's sequence: the first new trials get exactly the parameters of trials 0, 1, ...
(TPE samples its startup trials at random), and the new jobs reuse job numbers 0, 1, ...
Here the sampler seed is offset by the number of trials the study already has (so the
continuation draws new parameters, still reproducibly), and each job's number is its
Optuna trial number (unique in the study, and the same in the report and in MLflow).
The Hydra plugin class is ``hydra_plugins.vlm_sweep_plugins.OptunaSweeper``.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, List, Optional, Sequence

from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl

log = logging.getLogger(__name__)


def existing_trials(study_name: Optional[str], storage: Optional[Any]) -> int:
    """How many trials the stored study already has (0 without storage or study)."""
    if not study_name or not storage:
        return 0
    import optuna

    try:
        summaries = optuna.get_all_study_summaries(storage=storage, include_best_trial=False)
    except Exception:  # a storage optuna cannot open fails later, in create_study, with its own message
        return 0
    return next((s.n_trials for s in summaries if s.study_name == study_name), 0)


class ContinuingOptunaSweeperImpl(OptunaSweeperImpl):
    """The plugin's implementation with continuation-aware seeding and trial-numbered jobs."""

    def sweep(self, arguments: List[str]) -> None:
        done = existing_trials(self.study_name, self.storage)
        if done:
            self._reseed(done)
        super().sweep(arguments)

    def _reseed(self, done: int) -> None:
        """A fresh sampler seeded ``seed + done``: the next trials are new, and reproducible."""
        from hydra.utils import instantiate

        sampler_cfg = self.config.hydra.sweeper.sampler if self.config is not None else None
        seed = sampler_cfg.get("seed") if sampler_cfg is not None else None
        if isinstance(self.sampler, functools.partial) or seed is None:
            return  # the grid sampler skips finished grid points itself; unseeded samplers do not repeat
        self.sampler = instantiate(sampler_cfg, seed=int(seed) + done)
        log.info("continuing study %r: %d trial(s) already in it; sampler seed %d", self.study_name, done,
                 int(seed) + done)

    def _configure_trials(self, trials: List[Any], search_space_distributions: Any,
                          fixed_params: Any) -> Sequence[Sequence[str]]:
        # The plugin launches these trials right after, with initial_job_idx=self.job_idx.
        self.job_idx = trials[0].number
        return super()._configure_trials(trials, search_space_distributions, fixed_params)


def continuing(impl: OptunaSweeperImpl) -> ContinuingOptunaSweeperImpl:
    """The plugin's sweeper implementation, rebuilt as :class:`ContinuingOptunaSweeperImpl`."""
    new = ContinuingOptunaSweeperImpl(
        impl.sampler, impl.direction, impl.storage, impl.study_name, impl.n_trials, impl.n_jobs,
        impl.max_failure_rate, impl.search_space, None, impl.params)
    new.custom_search_space_extender = impl.custom_search_space_extender
    return new
