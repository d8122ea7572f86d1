"""parallel=fsdp: torch FSDP2 really shards the parameters across ranks, trains like one process,
checkpoints full weights and resumes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, run_launch

pytestmark = pytest.mark.slow

COMMON = ["tracking=none", "eval=none", "dataset.val_split=null", "scheduler=constant",
          "step_scheduler.global_batch_size=4", "step_scheduler.micro_batch_size=2",
          "step_scheduler.ckpt_every_steps=2"]


def _torchrun(run_dir: Path, *overrides: str, port: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
         str(ROOT / "launch.py"), "parallel=fsdp", f"hydra.run.dir={run_dir}", *COMMON, *overrides],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)


def _losses(run_dir: Path) -> list:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("packing", [[], ["dataset.packing=true"]], ids=["padded", "packed"])
def test_fsdp_shards_parameters_and_matches_one_process(tmp_path, packing):
    fsdp = tmp_path / "fsdp"
    proc = _torchrun(fsdp, "peft=none", "freeze=none", "step_scheduler.max_steps=2", *packing, port=29541)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((fsdp / f"sharding_rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["dtensor_params"] == r["params"] for r in ranks), "every parameter is a DTensor"
    assert ranks[0]["full_numel"] == ranks[1]["full_numel"]
    assert all(r["local_numel"] < 0.6 * r["full_numel"] for r in ranks), "each rank holds about half"

    single = tmp_path / "single"
    proc = run_launch([f"hydra.run.dir={single}", "peft=none", "freeze=none", "step_scheduler.max_steps=2",
                       *COMMON, *packing])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _losses(fsdp) == pytest.approx(_losses(single), rel=1e-4)
    a = load_file(fsdp / "checkpoints" / "step_2" / "model" / "model.safetensors")
    b = load_file(single / "checkpoints" / "step_2" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:  # full (gathered) weights, equal to one process's up to float noise
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-4)


def test_fsdp_lora_resumes_from_its_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    proc = _torchrun(run_dir, "peft=lora", "step_scheduler.max_steps=2", port=29543)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run_dir / "checkpoints" / "step_2" / "model" / "adapter_model.safetensors").exists()
    proc = _torchrun(run_dir, "peft=lora", "step_scheduler.max_steps=4", port=29545)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in (run_dir / "launch.log").read_text()
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
