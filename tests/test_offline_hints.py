"""Offline, a hub model or data set that is not here fails in one line whose next step is a command that works."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from vlm_sweep.hub import download_hint
from vlm_sweep.models.load import ModelLoadError, preflight_hub_access

HF = Path(sys.executable).parent / "hf"


def _suggested_command(message: str) -> list:
    commands = re.findall(r"`(hf download [^`]+)`", message)
    assert len(commands) == 1, message
    return shlex.split(commands[0])


def _assert_cli_accepts(command: list, tmp_path: Path) -> None:
    """The hub CLI this package installs parses the command (offline it then fails to reach the hub)."""
    assert HF.exists(), "the `hf` CLI named in the hint is not installed"
    args = [str(HF), *command[1:]]
    args[args.index("DIR")] = str(tmp_path / "dl")
    proc = subprocess.run([*args, "--dry-run"], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert "No such option" not in proc.stderr and "Usage:" not in proc.stderr, proc.stderr[-1500:]
    assert proc.returncode != 0 and "offline" in proc.stderr.lower()


def test_offline_model_error_names_a_working_download_command(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as info:
        preflight_hub_access("nobody-here/not-a-cached-model", revision="v1.0")
    message = str(info.value)
    assert "\n" not in message and "huggingface-cli" not in message
    assert "HF_HUB_OFFLINE is set" in message
    assert "if the model is gated" in message  # conditional: only the hub knows
    assert "model.pretrained_model_name_or_path=DIR" in message and "model=tiny_gemma3" in message
    command = _suggested_command(message)
    assert command[2:] == ["--revision", "v1.0", "nobody-here/not-a-cached-model", "--local-dir", "DIR"]
    _assert_cli_accepts(command, tmp_path)


def test_dataset_hint_downloads_a_dataset_repo_and_names_dataset_path(tmp_path):
    message = download_hint("naver-clova-ix/cord-v2", repo_type="dataset")
    assert "\n" not in message and "dataset.path=DIR" in message and "if the data set is gated" in message
    command = _suggested_command(message)
    assert command == ["hf", "download", "--repo-type", "dataset", "naver-clova-ix/cord-v2", "--local-dir", "DIR"]
    _assert_cli_accepts(command, tmp_path)
