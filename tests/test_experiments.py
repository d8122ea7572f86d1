"""The seed recipes: each experiment composes with its published values, names the real hub ids
(which fail fast offline), and its tiny twin trains a few steps; mixed image/no-image batches
train under DDP without a collective mismatch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, compose, run_launch
from vlm_sweep.config.validate import validate_config
from vlm_sweep.data.sets import all_specs, get_spec
from vlm_sweep.train import run

# Experiments built on a tiny model by design (no hub twin), each with the test that runs it.
DEMOS = {"receipts_demo": "tests/test_demo.py"}
EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml") if p.stem not in DEMOS)

# experiment -> (tiny model, fixture writer or None for the built-in synthetic receipts, dataset group)
TWINS = {
    "gemma3_4b_cord_v2": ("tiny_gemma3", None, "synthetic_receipts"),
    "gemma3_4b_cord_v2_lora": ("tiny_gemma3", None, "synthetic_receipts"),
    "gemma3_4b_medpix": ("tiny_gemma3", "medpix_vqa", "medpix_vqa"),
    "qwen2_5_vl_3b_cord_v2": ("tiny_qwen2_5_vl", None, "synthetic_receipts"),
    "nemotron_nano_v2_vl_raven": ("tiny_nemotron_vl", "raven", "raven"),
    "nemotron_nano_v2_vl_raven_lora_lm": ("tiny_nemotron_vl", "raven", "raven"),
    "nemotron_nano_v2_vl_raven_lora_all": ("tiny_nemotron_vl", "raven", "raven"),
    "nemotron_nano_v2_vl_video": ("tiny_nemotron_vl", "llava_video_178k", "llava_video_178k"),
    "nemotron_omni_cord_v2": ("tiny_nemotron_vl", None, "synthetic_receipts"),
    "nemotron_omni_cord_v2_lora": ("tiny_nemotron_vl", None, "synthetic_receipts"),
}
HUB_IDS = {"gemma3": "google/gemma-3-4b-it", "qwen2_5_vl": "Qwen/Qwen2.5-VL-3B-Instruct",
           "nemotron": "nvidia/NVIDIA-Nemotron-Nano-12B-v2-VL-BF16",
           "nemotron_omni": "nvidia/Nemotron-3-Nano-Omni-30B-A3B-Reasoning-BF16"}


def test_every_experiment_has_a_tiny_twin():
    assert set(EXPERIMENTS) == set(TWINS)
    for demo, test_file in DEMOS.items():  # a demo is its own twin: its test runs it
        assert (ROOT / "conf" / "experiment" / f"{demo}.yaml").is_file() and demo in (ROOT / test_file).read_text()


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_with_real_hub_ids(name):
    cfg = compose([f"experiment={name}"])
    validate_config(cfg)
    assert cfg.experiment_name == name
    assert cfg.model.pretrained_model_name_or_path in HUB_IDS.values() and cfg.model.tiny_recipe is None
    assert cfg.model.trust_remote_code == (cfg.model.family == "nemotron_vl_remote")  # only the hub remote-code model


def test_published_hyperparameters():
    sft = compose(["experiment=gemma3_4b_cord_v2"])
    assert (sft.optimizer.lr, sft.optimizer.weight_decay, list(sft.optimizer.betas)) == (1e-5, 0.01, [0.9, 0.95])
    assert (sft.step_scheduler.global_batch_size, sft.step_scheduler.micro_batch_size,
            sft.step_scheduler.max_steps, sft.step_scheduler.ckpt_every_steps) == (8, 1, 1000, 100)
    assert sft.freeze.freeze_vision_tower is True and sft.peft.method == "none"
    lora = compose(["experiment=gemma3_4b_cord_v2_lora"])
    assert (lora.peft.method, lora.peft.dim, lora.peft.alpha) == ("lora", 8, 32)
    raven = compose(["experiment=nemotron_nano_v2_vl_raven"])
    assert (raven.optimizer.lr, raven.scheduler.min_lr, raven.scheduler.warmup_steps) == (2e-5, 2e-6, 5)
    assert (raven.optimizer.weight_decay, raven.optimizer.max_grad_norm, raven.dataset.max_length) == (0.033, 1.0, 4096)
    assert (raven.step_scheduler.global_batch_size, raven.step_scheduler.max_steps,
            raven.step_scheduler.ckpt_every_steps) == (32, 2000, 200)
    lm = compose(["experiment=nemotron_nano_v2_vl_raven_lora_lm"])
    assert (lm.peft.dim, lm.peft.alpha, lm.freeze.freeze_language_model, lm.freeze.freeze_vision_tower) == \
        (16, 32, True, False)
    everything = compose(["experiment=nemotron_nano_v2_vl_raven_lora_all"])
    assert everything.peft.match_all_linear and everything.freeze.freeze_vision_projection is True
    video = compose(["experiment=nemotron_nano_v2_vl_video"])
    assert (video.dataset.max_length, video.step_scheduler.max_steps, video.step_scheduler.global_batch_size,
            video.optimizer.lr, video.scheduler.min_lr, video.scheduler.warmup_steps,
            video.step_scheduler.ckpt_every_steps) == (8192, 300, 16, 2e-6, 2e-7, 20, 50)


@pytest.mark.parametrize("experiment,hub_id", [("nemotron_nano_v2_vl_raven", HUB_IDS["nemotron"]),
                                               ("qwen2_5_vl_3b_cord_v2", HUB_IDS["qwen2_5_vl"]),
                                               ("nemotron_omni_cord_v2", HUB_IDS["nemotron_omni"])])
def test_hub_experiment_fails_fast_offline(tmp_path, experiment, hub_id):
    proc = run_launch([f"experiment={experiment}", f"hydra.run.dir={tmp_path}", "tracking=none"],
                      env={"HF_HUB_OFFLINE": "", "VLM_SWEEP_CACHE": str(tmp_path / "cache")}, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1
    assert hub_id in lines[0] and "tiny_" in lines[0]


@pytest.fixture(scope="module")
def fixture_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fixtures")
    return {name: spec.write_fixture(root / name) for name, spec in all_specs().items()}


@pytest.mark.slow
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_tiny_twin_trains(name, fixture_dirs, tmp_path):
    model, fixture, dataset = TWINS[name]
    overrides = [f"experiment={name}", f"model={model}", f"dataset={dataset}", "tracking=none",
                 "step_scheduler.max_steps=2", "step_scheduler.global_batch_size=2", "step_scheduler.micro_batch_size=1",
                 "step_scheduler.val_every_steps=2", "step_scheduler.ckpt_every_steps=2", "dataset.max_val_samples=2",
                 "eval.every_steps=2", "eval.num_samples=1", "eval.max_new_tokens=8"]
    if fixture:
        overrides.append(f"dataset.path={fixture_dirs[fixture]}")
    result = run(compose(overrides), tmp_path)
    assert result.status == "FINISHED" and result.step == 2
    assert result.val_loss is not None and any(k.startswith("eval/") for k in result.metrics)
    assert (Path(result.checkpoint) / "model").is_dir()


@pytest.mark.slow
def test_ddp_with_batches_that_have_no_image(tmp_path):
    """Rows cycle image / two images / multi-turn / text-only: under DDP some ranks' batches carry
    no image while the vision side trains; the gradient all-reduce must still line up."""
    data = get_spec("custom").write_fixture(tmp_path / "custom", num_rows=8, with_video=False)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29551",
         str(ROOT / "launch.py"), "parallel=ddp", f"hydra.run.dir={tmp_path / 'run'}", "dataset=custom",
         f"dataset.path={data}", "dataset.carve_val_fraction=null", "dataset.val_split=null", "eval=none",
         "tracking=none", "peft=none", "freeze=none", "step_scheduler.max_steps=6",
         "step_scheduler.global_batch_size=2", "step_scheduler.micro_batch_size=1",
         "step_scheduler.ckpt_every_steps=6"],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))
