"""No credential on disk, in the tracker or on the console: a planted secret is grepped for in
every file a single run and a local-launcher sweep write, the MLflow server's store and its artifacts."""

from __future__ import annotations

import pytest

from conftest import run_launch
from test_tracking_resilience import Server

URI_PASSWORD = "uri-pw-PLANTED-4242"
TOKEN = "hf_PLANTEDtoken9191"


def _files_holding(root, needles):
    hits = []
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            hits += [f"{path}: {n}" for n in needles if n.encode() in data]
    return hits


@pytest.mark.slow
def test_planted_secrets_reach_no_file_no_tracker_and_no_console(tmp_path):
    server = Server(tmp_path / "server")
    (tmp_path / "server").mkdir()
    server.start()
    try:
        env = {"MLFLOW_TRACKING_URI": f"http://alice:{URI_PASSWORD}@127.0.0.1:{server.port}", "HF_TOKEN": TOKEN,
               "MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": URI_PASSWORD}
        fast = ["step_scheduler.max_steps=2", "step_scheduler.ckpt_every_steps=2", "step_scheduler.val_every_steps=2",
                "dataset.max_val_samples=2", "eval=none", f"paths.output_root={tmp_path / 'outputs'}"]
        single = run_launch([f"hydra.run.dir={tmp_path / 'run'}", *fast], env=env)
        assert single.returncode == 0, single.stderr[-3000:]
        sweep = run_launch(["-m", "hydra/launcher=local", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                            "optimizer.lr=1e-3,2e-3", *fast], env=env)
        assert sweep.returncode == 0, sweep.stderr[-3000:]
        # A credential in a URI given on the command line (any key, any sweep) is refused before
        # Hydra writes or prints anything.
        refused = run_launch([f"hydra.run.dir={tmp_path / 'refused'}",
                              f"tracking.uri=http://bob:{URI_PASSWORD}@127.0.0.1:{server.port}", *fast], env=env)
        assert refused.returncode == 2 and "MLFLOW_TRACKING_PASSWORD" in refused.stderr
        tagged = run_launch(["-m", f"hydra.sweep.dir={tmp_path / 'refused_sweep'}", "optimizer.lr=1e-3,2e-3",
                             f"+tracking.tags.endpoint=http://bob:{URI_PASSWORD}@127.0.0.1:{server.port}", *fast],
                            env=env)
        assert tagged.returncode == 2 and "tracking.tags.endpoint" in tagged.stderr
    finally:
        server.kill()
    console = "".join(p.stdout + p.stderr for p in (single, sweep, refused, tagged))
    assert URI_PASSWORD not in console and TOKEN not in console
    # Everything the runs wrote (configs, .hydra, checkpoints, logs, submitit pickles, job status,
    # tracking.json, mlflow_parent.json, report) and the server's store and artifacts.
    written = [tmp_path / name for name in ("run", "sweep", "refused", "refused_sweep", "outputs", "server")]
    assert (tmp_path / "server" / "server.db").exists() and (tmp_path / "sweep" / "report.md").exists()
    hits = [hit for root in written if root.exists() for hit in _files_holding(root, [URI_PASSWORD, TOKEN])]
    assert hits == []
