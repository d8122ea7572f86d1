"""The inference commands end a user's mistake the way launch.py does: one line on stderr, exit 2.

A wrong override stops `evaluate` before any model loads; a mistyped run-dir path is
"checkpoint not found" for generate, export and evaluate alike (not a hub download hint).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from conftest import compose
from vlm_sweep.cli import evaluate as evaluate_cli


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory) -> Path:
    """A run dir laid out as training leaves it (LATEST, step dir, its config), with a stub adapter:
    enough to resolve and compose, and nothing a model could be loaded from."""
    run = tmp_path_factory.mktemp("saved_run")
    step = run / "checkpoints" / "step_1"
    (step / "model").mkdir(parents=True)
    (step / "model" / "adapter_config.json").write_text("{}")
    cfg = compose(["dataset=synthetic_receipts", "model=tiny_gemma3"])
    (step / "config.yaml").write_text(yaml.safe_dump(OmegaConf.to_container(cfg, resolve=True)))
    (run / "checkpoints" / "LATEST").write_text("step_1\n")
    return run


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail the test if anything tries to load a model."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the overrides were checked")

    monkeypatch.setattr("vlm_sweep.inference.load.load_for_inference", refuse)
    monkeypatch.setattr("vlm_sweep.inference.load.load_model", refuse)


@pytest.mark.parametrize("override, names", [
    ("dataset.splitt=test", "dataset.splitt"),                # a key that does not exist
    ("eval.batch_size=many", "eval.batch_size"),              # a value of the wrong type
    ("dataset=cordv2", "dataset=cordv2"),                     # an option the group does not have
    ("outputs/other_run", "outputs/other_run"),               # a stray second path
])
def test_evaluate_override_mistake_is_one_line_exit_2_before_loading(override, names, saved_run, tmp_path,
                                                                     no_model_loads, capsys):
    code = evaluate_cli.main(["--checkpoint", str(saved_run), "--output-dir", str(tmp_path / "out"), override])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error: ") and names in lines[0], err
    assert not (tmp_path / "out").exists()


def test_launch_and_evaluate_word_a_wrong_key_alike(saved_run, tmp_path, no_model_loads, capsys):
    from vlm_sweep.config.paths import conf_dir
    from vlm_sweep.config.validate import check_cli_overrides

    evaluate_cli.main(["--checkpoint", str(saved_run), "dataset.splitt=test"])
    assert capsys.readouterr().err.strip() == check_cli_overrides(["dataset.splitt=test"], conf_dir=conf_dir())


def test_a_key_of_a_free_form_section_is_left_to_hydra():
    """``dataset.synthetic.*`` (a section that defaults to None) is not refused, and does not crash the check."""
    from vlm_sweep.config.paths import conf_dir
    from vlm_sweep.config.validate import check_cli_overrides

    assert check_cli_overrides(["dataset=synthetic_receipts", "dataset.synthetic.num_train=2"],
                               conf_dir=conf_dir()) is None


@pytest.mark.parametrize("source, local", [
    ("outputs/nope", True),            # its parent exists here: a mistyped run dir
    ("./nope", True), ("/no/such/run", True), ("a/b/c", True), ("~/nope", True),
    ("google/gemma-3-4b-it", False),   # no google/ here: may be a hub id
    ("gpt2", False),
])
def test_what_counts_as_a_local_path(source, local, tmp_path, monkeypatch):
    from vlm_sweep.hub import names_a_local_path

    (tmp_path / "outputs").mkdir()
    monkeypatch.chdir(tmp_path)
    assert names_a_local_path(source) is local


@pytest.mark.parametrize("command", ["generate", "export", "evaluate"])
def test_a_mistyped_run_dir_is_checkpoint_not_found_everywhere(command, tmp_path):
    (tmp_path / "outputs" / "real_run").mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "r.png")
    extra = {"generate": ["--image", "r.png"], "export": ["--output-dir", "exported"], "evaluate": []}[command]
    proc = subprocess.run([sys.executable, "-m", f"vlm_sweep.cli.{command}", "--checkpoint", "outputs/nope",
                           *extra], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == ["error: checkpoint not found: outputs/nope (expected a run, "
                                                "checkpoints, step_<N>, model or export dir, or a hub id)"]
    assert not (tmp_path / "exported").exists()


def test_a_hub_like_id_still_goes_to_the_hub_logic(tmp_path):
    """``org/name`` with no ``org/`` here is not "checkpoint not found": offline, it gets the hub's hint."""
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "r.png")
    proc = subprocess.run([sys.executable, "-m", "vlm_sweep.cli.generate", "--checkpoint", "nosuchorg/nosuchmodel",
                           "--image", "r.png"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "checkpoint not found" not in proc.stderr
    assert "nosuchorg/nosuchmodel" in proc.stderr
