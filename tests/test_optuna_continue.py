"""Continuing an Optuna study (the same command, the same sweep dir) asks for new trials, numbered on."""

from __future__ import annotations

import json

import pytest

from conftest import run_launch

TINY = ["step_scheduler.max_steps=2", "step_scheduler.val_every_steps=2", "step_scheduler.ckpt_every_steps=2",
        "eval=none", "dataset.max_val_samples=2", "tracking=none"]


@pytest.mark.slow
def test_continued_study_gets_new_params_and_unique_job_numbers(tmp_path):
    import optuna

    sweep = tmp_path / "sweep"
    args = ["-m", "hparams_search=optuna", f"hydra.sweep.dir={sweep}", "hydra.sweeper.n_trials=2", *TINY]
    for _ in range(2):
        proc = run_launch(args, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]

    study = optuna.load_study(study_name="tiny_gemma3_synthetic_receipts", storage=f"sqlite:///{sweep / 'optuna.db'}")
    assert [t.number for t in study.trials] == [0, 1, 2, 3]
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 4
    params = {tuple(sorted(t.params.items())) for t in study.trials}
    assert len(params) == 4, study.trials  # the continuation did not replay trials 0 and 1

    statuses = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/job_status.json"))]
    assert sorted(s["job_num"] for s in statuses) == [0, 1, 2, 3]  # job number = trial number
    for trial in study.trials:  # each job ran its trial's parameters and reported its value
        job = next(s for s in statuses if s["job_num"] == trial.number)
        assert f"optimizer.lr={trial.params['optimizer.lr']}" in job["overrides"]
        assert job["objective"] == pytest.approx(trial.value)
    rows = [line.split("|")[1] for line in (sweep / "report.md").read_text().splitlines() if line.startswith("|")]
    job_cells = [cell.strip(" *★") for cell in rows if cell.strip(" *★").isdigit()]
    assert sorted(job_cells) == ["0", "1", "2", "3"]  # one row per job, no number twice
