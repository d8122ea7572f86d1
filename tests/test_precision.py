"""parallel.mixed_precision=auto: bf16 where the device runs it well, fp32 elsewhere, and the log says why."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from conftest import FAMILIES, compose
from vlm_sweep.training import precision
from vlm_sweep.models.load import language_hidden_size
from vlm_sweep.training.precision import CPU_BF16_MIN_HIDDEN, resolve_precision


@pytest.mark.parametrize("cuda, gpu_bf16, cpu_bf16, hidden, expected", [
    (True, True, None, 64, "bf16"),            # a bf16 GPU: always (tiny or not)
    (True, False, None, 4096, "no"),           # a V100: no bf16
    (False, None, None, 4096, "no"),           # a CPU without bf16 instructions
    (False, None, "AVX512-BF16", 2560, "bf16"),  # Gemma 3 4B on a bf16 CPU
    (False, None, "AMX", CPU_BF16_MIN_HIDDEN, "bf16"),
    (False, None, "AVX512-BF16", CPU_BF16_MIN_HIDDEN - 1, "no"),  # too narrow to pay for the casts
    (False, None, "AVX512-BF16", None, "bf16"),  # width unknown: taken as a real model's
])
def test_auto_follows_the_device_and_the_model_width(monkeypatch, cuda, gpu_bf16, cpu_bf16, hidden, expected):
    monkeypatch.setattr(precision, "cpu_bf16_instructions", lambda: cpu_bf16)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: gpu_bf16)
    chosen, why = resolve_precision("auto", hidden, cuda=cuda)
    assert chosen == expected
    assert why.startswith("auto:") and (cpu_bf16 or "GPU" in why or "no native bf16" in why)


@pytest.mark.parametrize("requested, accelerate_name", [("no", "no"), ("fp32", "no"), ("bf16", "bf16"),
                                                       ("fp16", "fp16")])
def test_an_explicit_precision_is_taken_as_written(monkeypatch, requested, accelerate_name):
    """fp32 (what the log calls it) means no autocast, as no does."""
    monkeypatch.setattr(precision, "cpu_bf16_instructions", lambda: "AMX")
    assert resolve_precision(requested, 64, cuda=False, started_in="bf16") == (accelerate_name, "as configured")


@pytest.mark.parametrize("family_config", FAMILIES)
def test_the_width_read_is_the_language_models_for_every_family(family_config):
    """The config lookup must find the text model (not the vision tower's narrower config) in every
    family's layout: the width it reads is the loaded model's input-embedding width."""
    from vlm_sweep.models.load import language_width, load_model, resolve_source

    model_cfg = compose([f"model={family_config}"]).model
    source = resolve_source(model_cfg)
    width = language_width(source, model_cfg)
    model = load_model(source, model_cfg)
    assert width == model.get_input_embeddings().weight.shape[1]


def test_every_published_family_config_is_above_the_cpu_line():
    """The hub models users fine-tune are all wide enough for bf16 on a bf16 CPU (their default
    configs, built from the real config classes; no hub needed)."""
    from transformers import Gemma3Config, Qwen2_5_VLConfig

    for config in (Gemma3Config(), Qwen2_5_VLConfig()):
        assert language_hidden_size(config) >= 1024


def _first_loss_and_log(tmp_path, caplog, name, extra):
    from vlm_sweep.train import run

    cfg = compose(["tracking=none", "eval=none", "dataset.val_split=null", "dataset.preflight_samples=0",
                   "step_scheduler.max_steps=1", "checkpoint.enabled=false", *extra])
    with caplog.at_level(logging.INFO, logger="vlm_sweep.train"):
        assert run(cfg, tmp_path / name).status == "FINISHED"
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("mixed precision:"))
    caplog.clear()
    rows = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    return json.loads(rows[0])["loss"], line


def test_a_bf16_run_on_the_cpu_autocasts_and_auto_says_why(tmp_path, caplog):
    """bf16 on a CPU really runs under autocast (the first loss moves, a little), and auto's choice for
    the 64-wide tiny model is logged with its reason."""
    fp32, fp32_line = _first_loss_and_log(tmp_path, caplog, "fp32", ["parallel.mixed_precision=no"])
    bf16, bf16_line = _first_loss_and_log(tmp_path, caplog, "bf16", ["parallel.mixed_precision=bf16"])
    auto, auto_line = _first_loss_and_log(tmp_path, caplog, "auto", [])
    assert fp32_line.startswith("mixed precision: fp32 (parallel.mixed_precision=no")
    assert bf16_line.startswith("mixed precision: bf16 (parallel.mixed_precision=bf16")
    assert bf16 != fp32 and bf16 == pytest.approx(fp32, rel=2e-2)
    expected, why = resolve_precision("auto", 64)
    assert auto_line.endswith(f"(parallel.mixed_precision=auto; {why})")
    assert auto == (fp32 if expected == "no" else bf16)


@pytest.mark.parametrize("cuda, gpu_bf16, started_in, fresh_cpu_bf16, expected", [
    (False, None, "bf16", None, "bf16"),   # checkpointed on a bf16 CPU, requeued on an AVX2 one: stays bf16
    (False, None, "no", "AMX", "no"),      # checkpointed in fp32, requeued on an AMX node: stays fp32
    (True, False, "bf16", None, "no"),     # requeued on a GPU without bf16: cannot keep it
    (True, True, "bf16", None, "bf16"),
])
def test_a_resumed_auto_run_keeps_its_checkpoints_precision(monkeypatch, cuda, gpu_bf16, started_in,
                                                            fresh_cpu_bf16, expected):
    monkeypatch.setattr(precision, "cpu_bf16_instructions", lambda: fresh_cpu_bf16)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: gpu_bf16)
    chosen, why = resolve_precision("auto", 2560, cuda=cuda, started_in=started_in)
    assert chosen == expected
    fresh, _ = resolve_precision("auto", 2560, cuda=cuda)
    assert ("kept" in why) == (chosen != fresh)


def test_a_run_checkpointed_in_bf16_resumes_in_bf16_on_a_machine_where_auto_says_fp32(tmp_path, caplog,
                                                                                        monkeypatch):
    """The first part runs where auto picks bf16 (the line lowered below the tiny model's width, the CPU
    said to have AMX); the resume runs here, where auto alone picks fp32 for it. The checkpoints record
    bf16 and the resumed run keeps it, saying so."""
    from vlm_sweep.train import run

    base = ["tracking=none", "eval=none", "dataset.val_split=null", "dataset.preflight_samples=0",
            "step_scheduler.ckpt_every_steps=1"]
    run_dir = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(precision, "CPU_BF16_MIN_HIDDEN", 32)
        m.setattr(precision, "cpu_bf16_instructions", lambda: "AMX")
        assert run(compose(base + ["step_scheduler.max_steps=1"]), run_dir).status == "FINISHED"
    monkeypatch.setattr(precision, "cpu_bf16_instructions", lambda: None)  # an AVX2 node
    with caplog.at_level(logging.INFO, logger="vlm_sweep.train"):
        assert run(compose(base + ["step_scheduler.max_steps=2"]), run_dir).step == 2
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("mixed precision:"))
    assert line.startswith("mixed precision: bf16 (parallel.mixed_precision=auto; auto: kept bf16")
    for step in (1, 2):
        state = json.loads((run_dir / "checkpoints" / f"step_{step}" / "training_state" / "trainer_state.json")
                           .read_text())
        assert state["compute_precision"] == "bf16"
