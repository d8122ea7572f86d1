"""End to end: a composed run trains, checkpoints and is tracked; the step maths is right."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, compose, run_launch
from vlm_sweep.train import run

FAST = ["step_scheduler.max_steps=4", "step_scheduler.val_every_steps=2", "step_scheduler.ckpt_every_steps=2",
        "dataset.max_val_samples=4", "eval=none"]


def _losses(run_dir: Path) -> list:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_default_run_trains_checkpoints_and_tracks(tmp_path, mlflow_uri):
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run"
    proc = run_launch([f"hydra.run.dir={run_dir}", f"tracking.uri={mlflow_uri}",
                       "step_scheduler.max_steps=30", "optimizer.lr=3e-3", "step_scheduler.val_every_steps=15",
                       "step_scheduler.ckpt_every_steps=15"], env={"HF_TOKEN": "hf_supersecret_value"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "run FINISHED at step 30" in proc.stdout
    losses = _losses(run_dir)
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5

    # Checkpoint layout: LATEST -> step_30, a PEFT adapter plus the processor, training state.
    ckpt_root = run_dir / "checkpoints"
    assert (ckpt_root / "LATEST").read_text().strip() == "step_30"
    model_dir = ckpt_root / "step_30" / "model"
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "chat_template.jinja"):
        assert (model_dir / name).exists(), name
    assert sorted(p.name for p in ckpt_root.glob("step_*")) == ["step_15", "step_30"]

    # MLflow: params, per-step metrics, the config artifact, FINISHED; no secret anywhere.
    run_id = json.loads((run_dir / "tracking.json").read_text())["run_id"]
    client = MlflowClient(mlflow_uri)
    mlrun = client.get_run(run_id)
    assert mlrun.info.status == "FINISHED"
    assert float(mlrun.data.params["optimizer.lr"]) == 3e-3
    assert mlrun.data.params["model.family"] == "gemma3"
    # The precision auto resolved to on this machine (the 64-wide tiny model: fp32 on any CPU).
    assert mlrun.data.params["parallel.mixed_precision"] == "auto"
    assert mlrun.data.params["compute_precision"] == "fp32"
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == list(range(1, 31))
    assert len(client.get_metric_history(run_id, "val_loss")) == 2
    # Generation-based task metrics at the end (eval.every_steps=150 > max_steps).
    assert [m.step for m in client.get_metric_history(run_id, "eval/ted_accuracy")] == [30]
    assert 0.0 <= client.get_metric_history(run_id, "eval/field_f1")[0].value <= 1.0
    assert "config.yaml" in [a.path for a in client.list_artifacts(run_id)]
    assert "hf_supersecret_value" not in json.dumps(mlrun.data.params)
    assert "hf_supersecret_value" not in (run_dir / "config.yaml").read_text()


def test_lora_checkpoint_loads_with_peft(tmp_path, gemma3_dir):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    cfg = compose(FAST + ["tracking=none"])
    result = run(cfg, tmp_path)
    assert result.status == "FINISHED" and result.step == 4
    model_dir = Path(result.checkpoint) / "model"
    base = AutoModelForImageTextToText.from_pretrained(gemma3_dir)
    peft_model = PeftModel.from_pretrained(base, model_dir)
    trained = load_file(model_dir / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in trained.items())
    assert type(AutoProcessor.from_pretrained(model_dir)).__name__ == "Gemma3Processor"
    assert peft_model.peft_config["default"].r == 8


def test_frozen_parameters_do_not_change(tmp_path, gemma3_dir):
    cfg = compose(FAST + ["tracking=none", "peft=none", "freeze=vision_frozen",
                          "checkpoint.keep_last=1"])
    result = run(cfg, tmp_path)
    before = load_file(gemma3_dir / "model.safetensors")
    after = load_file(Path(result.checkpoint) / "model" / "model.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "nothing trained"
    assert not any("vision_tower" in k or "embed_tokens" in k for k in changed)
    assert any("language_model" in k and ".layers." in k for k in changed)
    assert any("multi_modal_projector" in k for k in changed)


def _first_step(tmp_path: Path, name: str, overrides: list) -> dict:
    cfg = compose(["tracking=none", "peft=none", "freeze=none", "step_scheduler.max_steps=1",
                   "dataset.val_split=null", "eval=none", "scheduler=constant", "optimizer.max_grad_norm=null",
                   *overrides])
    run(cfg, tmp_path / name)
    return json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0])


def test_gradient_accumulation_normalises_by_label_tokens(tmp_path):
    """4 samples as 4 micro-batches of 1 == one batch of 4: loss and gradient are per label token
    of the whole step (averaging per micro-batch would change both, samples differ in length)."""
    accumulated = _first_step(tmp_path, "accum", ["step_scheduler.global_batch_size=4",
                                                   "step_scheduler.micro_batch_size=1"])
    single = _first_step(tmp_path, "single", ["step_scheduler.global_batch_size=4",
                                               "step_scheduler.micro_batch_size=4"])
    assert accumulated["label_tokens"] == single["label_tokens"]
    for key in ("loss", "grad_norm"):
        assert accumulated[key] == pytest.approx(single[key], rel=1e-4), key


def test_zero_label_step_is_not_nan_and_does_not_move_weights(tmp_path):
    from vlm_sweep.data.collate import IGNORE_INDEX, VLMCollator

    # The pre-flight check would refuse these label-less records before training: this tests the step.
    cfg = compose(FAST + ["tracking=none", "peft=none", "freeze=none", "dataset.val_split=null", "eval=none",
                          "dataset.preflight_samples=0"])
    original_call = VLMCollator.__call__

    def no_labels(self, samples):
        batch = original_call(self, samples)
        batch["labels"].fill_(IGNORE_INDEX)
        return batch

    VLMCollator.__call__ = no_labels
    try:
        result = run(cfg, tmp_path)
    finally:
        VLMCollator.__call__ = original_call
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss"] == 0.0 and r["label_tokens"] == 0 and r["grad_norm"] == 0.0 for r in rows)
    assert result.status == "FINISHED"


def test_hub_model_offline_fails_fast_with_clear_message(tmp_path):
    """Stops before any model or data work (no wall-clock bound: the machine may be busy)."""
    proc = run_launch(["model=gemma3", "peft=lora", f"hydra.run.dir={tmp_path}", "tracking=none"],
                      env={"HF_HUB_OFFLINE": "", "VLM_SWEEP_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "google/gemma-3-4b-it" in lines[0]
    assert "HF_TOKEN" in lines[0] and "tiny_gemma3" in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "cache" / "data").exists() and not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.slow
@pytest.mark.parametrize("packing", [[], ["dataset.packing=true"]], ids=["padded", "packed"])
def test_torchrun_ddp_two_cpu_processes_matches_single_process(tmp_path, packing):
    """2 gloo ranks x micro 2 == 1 process x 2 micro-batches: same samples, same update (packed too)."""
    common = ["tracking=none", "peft=none", "freeze=none", "step_scheduler.max_steps=2",
              "step_scheduler.global_batch_size=4", "step_scheduler.micro_batch_size=2",
              "dataset.val_split=null", "eval=none", "scheduler=constant", *packing,
              # AdamW's first steps are lr * g / (|g| + eps): for a weight whose gradient is ~1e-7 (a vision
              # bias here) eps=1e-8 turns the float noise of summing in another order (all-reduce vs
              # accumulation) into a 1% different step. 1e-6 keeps the comparison about the gradients.
              "optimizer.eps=1e-6"]
    ddp_dir = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
         str(ROOT / "launch.py"), "parallel=ddp", f"hydra.run.dir={ddp_dir}", *common],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single_dir = tmp_path / "single"
    proc = run_launch([f"hydra.run.dir={single_dir}", *common])
    assert proc.returncode == 0, proc.stderr[-3000:]
    torch.testing.assert_close(torch.tensor(_losses(ddp_dir)), torch.tensor(_losses(single_dir)),
                               rtol=1e-4, atol=1e-5)
    ddp = load_file(ddp_dir / "checkpoints" / "step_2" / "model" / "model.safetensors")
    single = load_file(single_dir / "checkpoints" / "step_2" / "model" / "model.safetensors")
    for key in single:
        torch.testing.assert_close(ddp[key], single[key], rtol=1e-4, atol=1e-5)
