"""`evaluate` scores a run on the data it was trained with (a local dataset.path), not on the hub id."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import compose
from vlm_sweep.data.synthetic_receipts import generate_synthetic_receipts
from vlm_sweep.cli.evaluate import main as evaluate
from vlm_sweep.train import run


@pytest.fixture(scope="module")
def local_cord_run(tmp_path_factory):
    """A run trained with dataset=cord_v2 (a hub id by default) on a local copy in cord-v2's schema."""
    root = tmp_path_factory.mktemp("local_cord")
    data = generate_synthetic_receipts(root / "cord_copy", num_train=8, num_validation=4, num_test=5, seed=3)
    run_dir = root / "run"
    run(compose(["dataset=cord_v2", f"dataset.path={data}", "dataset.max_length=512", "tracking=none", "eval=none",
                 "step_scheduler.max_steps=1", "step_scheduler.ckpt_every_steps=1", "dataset.max_val_samples=2"]),
        run_dir)
    return run_dir, data


def _evaluate(run_dir: Path, out: Path, *overrides: str) -> dict:
    code = evaluate(["--checkpoint-path", str(run_dir), "--max-new-tokens", "4", "--output-dir", str(out), *overrides])
    assert code == 0
    return json.loads((out / "summary.json").read_text())


@pytest.mark.slow
def test_evaluate_reuses_the_runs_dataset_settings_unless_overridden(local_cord_run, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing may come from the hub
    run_dir, data = local_cord_run
    summary = _evaluate(run_dir, tmp_path / "default")
    assert (summary["dataset"], summary["dataset_path"], summary["split"]) == ("cord_v2", str(data), "test")
    assert summary["num_samples"] == 5  # the local copy's test split

    # A key on the command line wins; the run's other settings (the local path) stay.
    summary = _evaluate(run_dir, tmp_path / "val", "dataset.split=validation")
    assert (summary["dataset_path"], summary["split"], summary["num_samples"]) == (str(data), "validation", 4)

    # Another data set picked on the command line reuses nothing from the run.
    other = generate_synthetic_receipts(tmp_path / "other", num_train=2, num_validation=2, num_test=3, seed=4)
    summary = _evaluate(run_dir, tmp_path / "other_eval", "dataset=synthetic_receipts", f"dataset.path={other}",
                        "dataset.synthetic.num_train=2", "dataset.synthetic.num_validation=2",
                        "dataset.synthetic.num_test=3", "dataset.synthetic.seed=4")
    assert (summary["dataset"], summary["dataset_path"], summary["num_samples"]) == ("synthetic_receipts",
                                                                                       str(other), 3)
