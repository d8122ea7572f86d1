"""Checkpoints are verified before use, fall back past damage, fail cleanly on a full disk,
honour the umask and store each trained weight once.

The checkpoints here are written by save_checkpoint itself, on tiny real models with a real
Accelerator and optimizer, then damaged the way crashes, full disks and bit rot damage them.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import stat
from collections import namedtuple
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import FAMILIES, compose
from vlm_sweep.training import checkpoint as ckpt



@dataclass
class Parts:
    cfg: Any
    model: Any
    processor: Any
    optimizer: Any
    scheduler: Any
    loader: Any


@pytest.fixture(scope="module")
def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def _parts(overrides: list) -> Parts:
    from torchdata.stateful_dataloader import StatefulDataLoader

    from vlm_sweep.models.load import load_model_and_processor
    from vlm_sweep.models.registry import get_family
    from vlm_sweep.training.freeze import apply_freeze
    from vlm_sweep.training.lora import apply_lora
    from vlm_sweep.training.optim import build_optimizer, build_scheduler

    cfg = compose(["tracking=none", *overrides])
    family = get_family(cfg.model.family)
    model, processor = load_model_and_processor(cfg.model)
    if cfg.peft.method == "lora":
        model = apply_lora(model, family, cfg.peft, cfg.freeze)
    apply_freeze(model, family, cfg.freeze)
    optimizer = build_optimizer(model, cfg.optimizer)
    scheduler = build_scheduler(optimizer, cfg.scheduler, 100, cfg.optimizer.lr)
    parts = Parts(cfg, model, processor, optimizer, scheduler, StatefulDataLoader(list(range(8)), batch_size=2))
    _train_step(parts)
    return parts


def _train_step(parts: Parts) -> None:
    """One optimizer step: every trained weight and its Adam moments change."""
    loss = sum((p.float() - 0.1).square().sum() for p in parts.model.parameters() if p.requires_grad)
    loss.backward()
    parts.optimizer.step()
    parts.scheduler.step()
    parts.optimizer.zero_grad()


def _save(parts: Parts, root: Path, step: int, accelerator, **kwargs) -> Path:
    cfg = kwargs.pop("checkpoint_cfg", parts.cfg.checkpoint)
    return ckpt.save_checkpoint(
        root, step, accelerator=accelerator, model=parts.model, processor=parts.processor,
        optimizer=parts.optimizer, scheduler=parts.scheduler, dataloader=parts.loader,
        trainer_state={"step": step}, config_yaml="seed: 1\n", checkpoint_cfg=cfg, **kwargs)


def _auto(root: Path):
    return ckpt.resolve_resume(namedtuple("C", "resume")("auto"), root)


def _warnings(caplog) -> list:
    return [r.getMessage() for r in caplog.records
            if r.levelno >= logging.WARNING and r.name.startswith("vlm_sweep.training.checkpoint")]


Saved = namedtuple("Saved", "parts root")


@pytest.fixture(scope="module")
def saved(tmp_path_factory, accelerator) -> Saved:
    """A LoRA run's checkpoints dir with step_1 and step_2 (keep_last=5), written once per module."""
    parts = _parts(["model=tiny_gemma3", "peft=lora", "checkpoint.keep_last=5"])
    root = tmp_path_factory.mktemp("saved") / "checkpoints"
    _save(parts, root, 1, accelerator)
    _train_step(parts)
    _save(parts, root, 2, accelerator)
    return Saved(parts, root)


@pytest.fixture
def root(saved, tmp_path) -> Path:
    """A private copy of the saved checkpoints dir, to damage."""
    return Path(shutil.copytree(saved.root, tmp_path / "checkpoints"))


def test_manifest_lists_every_file_with_size_and_checksum(root):
    step = root / "step_2"
    manifest = json.loads((step / "manifest.json").read_text())["files"]
    on_disk = {p.relative_to(step).as_posix() for p in step.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(manifest) == on_disk and "model/adapter_model.safetensors" in on_disk
    for name, entry in manifest.items():
        assert entry["size"] == (step / name).stat().st_size and len(entry["crc32"]) == 8
    assert ckpt.verify_checkpoint(step) is None and _auto(root) == step


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated trainable.pt": (lambda r: _truncate(r / "step_2/training_state/trainable.pt"),
                               "training_state/trainable.pt has"),
    "truncated optimizer.pt": (lambda r: _truncate(r / "step_2/training_state/optimizer.pt"),
                               "training_state/optimizer.pt has"),
    "missing adapter": (lambda r: (r / "step_2/model/adapter_model.safetensors").unlink(),
                        "model/adapter_model.safetensors is missing"),
    "flipped byte": (lambda r: _flip_byte(r / "step_2/training_state/optimizer.pt"),
                     "optimizer.pt does not match its checksum"),
    "LATEST names a missing dir": (lambda r: shutil.rmtree(r / "step_2"),
                                   "LATEST names step_2, but it does not exist"),
    "no manifest, no trainer state": (lambda r: ((r / "step_2/manifest.json").unlink(),
                                                 (r / "step_2/training_state/trainer_state.json").unlink()),
                                      "no manifest.json and no training_state/trainer_state.json"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_with_one_warning(root, caplog, damage):
    harm, expected = DAMAGE[damage]
    harm(root)
    caplog.set_level(logging.INFO)
    assert _auto(root) == root / "step_1"
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert expected in warnings[0] and "resuming from" in warnings[0] and "step_1" in warnings[0]


def test_deleted_latest_resumes_from_newest_complete_checkpoint(root, caplog):
    (root / "LATEST").unlink()
    caplog.set_level(logging.INFO)
    assert _auto(root) == root / "step_2"  # not a silent restart from step 0
    assert any("LATEST is missing" in m and "step_2" in m for m in _warnings(caplog))


def test_nothing_usable_is_an_error_not_a_fresh_start(root):
    for step in ("step_1", "step_2"):
        _truncate(root / step / "training_state" / "optimizer.pt")
    with pytest.raises(ckpt.CheckpointError, match="no usable checkpoint") as err:
        _auto(root)
    assert "\n" not in str(err.value)


def test_checkpoint_written_before_manifests_is_accepted(root, saved, accelerator):
    (root / "step_2" / "manifest.json").unlink()
    assert _auto(root) == root / "step_2"
    state = ckpt.load_checkpoint(root / "step_2", accelerator=accelerator, model=saved.parts.model,
                                 optimizer=saved.parts.optimizer, scheduler=saved.parts.scheduler,
                                 dataloader=saved.parts.loader)
    assert state["step"] == 2


def test_stray_dirs_are_ignored_when_resuming_and_pruning(root, saved, accelerator):
    for stray in ("step_6.tmp", "step_x", "step_", ".tmp_step_6"):
        (root / stray).mkdir()
        (root / stray / "file").write_text("x")
    assert _auto(root) == root / "step_2"
    _save(saved.parts, root, 3, accelerator)
    assert all((root / s / "file").exists() for s in ("step_6.tmp", "step_x", "step_"))
    assert not (root / ".tmp_step_6").exists()  # our own stale temp dir
    assert (root / "LATEST").read_text().strip() == "step_3"


def test_pruning_counts_only_complete_checkpoints_and_drops_a_dangling_best(root, saved, accelerator, caplog):
    from omegaconf import OmegaConf

    _truncate(root / "step_2" / "training_state" / "optimizer.pt")
    (root / "BEST").write_text("step_0\n")  # pruned by hand, or by an older version
    caplog.set_level(logging.INFO)
    cfg = OmegaConf.merge(saved.parts.cfg.checkpoint, {"keep_last": 2})
    _save(saved.parts, root, 3, accelerator, checkpoint_cfg=cfg)
    assert sorted(p.name for p in root.glob("step_*")) == ["step_1", "step_3"]  # step_1 is the fallback kept
    assert not (root / "BEST").exists() and ckpt.best_checkpoint(root) is None
    assert any("BEST names step_0" in m for m in _warnings(caplog))

    _save(saved.parts, root, 4, accelerator, checkpoint_cfg=cfg, is_best=True)
    _save(saved.parts, root, 5, accelerator, checkpoint_cfg=OmegaConf.merge(cfg, {"keep_last": 1}))
    assert sorted(p.name for p in root.glob("step_*")) == ["step_4", "step_5"]  # BEST's is kept
    assert ckpt.best_checkpoint(root) == root / "step_4"


@pytest.fixture
def fake_disk(monkeypatch):
    """shutil.disk_usage reporting ``free`` bytes (set on the returned dict)."""
    state = {"free": 10 ** 12}
    real = shutil.disk_usage

    def usage(path):
        total, used, _ = real(path)
        return type(real(path))(total, used, state["free"])

    monkeypatch.setattr(shutil, "disk_usage", usage)
    return state


def _no_space_errors():
    from safetensors import SafetensorError

    return {
        "OSError": OSError(errno.ENOSPC, "No space left on device"),
        # What torch.save and safetensors really raise when a tmpfs fills up:
        "torch.save": RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),
        "safetensors": SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
    }


@pytest.mark.parametrize("kind", ["OSError", "torch.save", "safetensors"])
def test_full_disk_removes_the_partial_dir_and_names_the_intact_checkpoint(root, saved, accelerator,
                                                                          monkeypatch, fake_disk, caplog, kind):
    error, real_save = _no_space_errors()[kind], torch.save

    def failing_save(obj, path, *args, **kwargs):
        if str(path).endswith("optimizer.pt"):
            fake_disk["free"] = 0
            raise error
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    fake_disk["free"] = 1000
    caplog.set_level(logging.INFO)
    with pytest.raises(ckpt.CheckpointError) as err:
        _save(saved.parts, root, 3, accelerator)
    message = str(err.value)
    assert "\n" not in message
    assert str(root / "step_3") in message and "no space left on device" in message
    assert "needs about" in message and "0.0 MB was free" in message
    assert f"the previous checkpoint {root / 'step_2'} is intact" in message
    assert not (root / ".tmp_step_3").exists() and not (root / "step_3").exists()
    assert (root / "LATEST").read_text().strip() == "step_2" and _auto(root) == root / "step_2"
    assert any("needs about" in m and "only 0.0 MB is free" in m for m in _warnings(caplog))


def test_a_bug_while_saving_is_not_reported_as_a_disk_problem(root, saved, accelerator, monkeypatch):
    def buggy(*args, **kwargs):
        raise KeyError("bug")

    monkeypatch.setattr(ckpt, "save_model_dir", buggy)
    with pytest.raises(KeyError):
        _save(saved.parts, root, 3, accelerator)
    assert not (root / ".tmp_step_3").exists()


def _modes(step: Path) -> dict:
    return {p.relative_to(step).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in [step, *step.rglob("*")]}


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
@pytest.mark.parametrize("peft", ["none", "lora"])
def test_every_checkpoint_file_honours_the_umask(tmp_path, accelerator, peft, umask):
    parts = _parts(["model=tiny_gemma3", f"peft={peft}"])
    old = os.umask(umask)
    try:
        step = _save(parts, tmp_path / "checkpoints", 1, accelerator)
    finally:
        os.umask(old)
    modes = _modes(step)
    weights = "model/model.safetensors" if peft == "none" else "model/adapter_model.safetensors"
    assert modes[weights] == 0o666 & ~umask  # safetensors alone would make it 0600
    assert {m for n, m in modes.items() if (step / n).is_file()} == {0o666 & ~umask}
    assert {m for n, m in modes.items() if (step / n).is_dir()} == {0o777 & ~umask}


def _trainable(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("freeze", ["none", "vision_frozen"])
@pytest.mark.parametrize("family", FAMILIES)
def test_full_finetune_stores_trained_weights_once_and_resumes_bitwise(tmp_path, accelerator, family, freeze):
    parts = _parts([f"model={family}", "peft=none", f"freeze={freeze}"])
    step = _save(parts, tmp_path / "checkpoints", 1, accelerator)
    weights, moments = _trainable(parts.model), [s["exp_avg"].clone() for s in parts.optimizer.state.values()]

    state_dir = step / "training_state"
    in_model = json.loads((state_dir / "weights_in_model.json").read_text())
    in_pt = torch.load(state_dir / "trainable.pt") if (state_dir / "trainable.pt").exists() else {}
    assert set(in_model) | set(in_pt) == set(weights) and not set(in_model) & set(in_pt)  # each once
    pt_bytes = sum(t.numel() * t.element_size() for t in in_pt.values())
    assert pt_bytes < 0.25 * sum(t.numel() * t.element_size() for t in weights.values())  # not a 2nd copy

    _train_step(parts)  # move away from the checkpoint, then come back
    assert not all(torch.equal(p, weights[n]) for n, p in _trainable(parts.model).items())
    ckpt.load_checkpoint(step, accelerator=accelerator, model=parts.model, optimizer=parts.optimizer,
                         scheduler=parts.scheduler, dataloader=parts.loader)
    restored = _trainable(parts.model)
    assert restored.keys() == weights.keys() and all(torch.equal(restored[n], weights[n]) for n in weights)
    assert all(torch.equal(s["exp_avg"], m) for s, m in zip(parts.optimizer.state.values(), moments))
    assert ckpt.trained_weights(step).keys() == weights.keys()


def test_torch_save_full_finetune_reads_trained_weights_from_the_model_dir(tmp_path, accelerator):
    parts = _parts(["model=tiny_gemma3", "peft=none", "freeze=none", "checkpoint.model_save_format=torch_save"])
    step = _save(parts, tmp_path / "checkpoints", 1, accelerator)
    weights = _trainable(parts.model)
    assert (step / "model" / "pytorch_model.bin").exists()
    assert not (step / "training_state" / "trainable.pt").exists()
    loaded = ckpt.trained_weights(step)
    assert loaded.keys() == weights.keys() and all(torch.equal(loaded[n], weights[n]) for n in weights)


FULL_DISK_DRIVER = '''
import errno, runpy, sys
import torch
real_save = torch.save
def full_disk(obj, path, *args, **kwargs):
    if str(path).endswith("tmp_step_4/training_state/optimizer.pt"):
        raise OSError(errno.ENOSPC, "No space left on device")
    return real_save(obj, path, *args, **kwargs)
torch.save = full_disk
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


@pytest.mark.slow
def test_full_disk_during_a_run_is_one_line_and_the_rerun_resumes(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT, run_launch

    args = [f"hydra.run.dir={tmp_path}", "tracking=none", "eval=none", "dataset.val_split=null",
            "step_scheduler.max_steps=4", "step_scheduler.ckpt_every_steps=2"]
    driver = tmp_path / "driver.py"
    driver.write_text(FULL_DISK_DRIVER)
    proc = subprocess.run([sys.executable, str(driver), str(ROOT / "launch.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    root = tmp_path / "checkpoints"
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "error: could not write checkpoint" in proc.stderr and f"{root / 'step_2'} is intact" in proc.stderr
    assert not (root / ".tmp_step_4").exists() and (root / "LATEST").read_text().strip() == "step_2"

    proc = run_launch(args)  # the disk has room again
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (root / "LATEST").read_text().strip() == "step_4"
