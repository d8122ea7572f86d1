"""The commands share one flag set: same names, aliases and defaults; old spellings keep working;
a user error is one line and exit 2; evaluate finds its configs from any directory."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT
from vlm_sweep.cli.args import EVALUATE, EXPORT, FLAGS, GENERATE, build_parser
from vlm_sweep.inference.generate import SamplingConfig

COMMANDS = {"generate": GENERATE, "evaluate": EVALUATE, "export": EXPORT}


def _parse(command: str, *argv: str):
    parser = build_parser(command, "", COMMANDS[command], required=())
    return parser.parse_known_args(list(argv))[0]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_takes_the_checkpoint_under_both_names(command):
    assert _parse(command, "--checkpoint", "a").checkpoint == "a"
    assert _parse(command, "--checkpoint-path", "b").checkpoint == "b"  # the old spelling


def test_a_shared_flag_has_one_default_everywhere():
    for name in set(GENERATE) & set(EVALUATE):
        assert getattr(_parse("generate"), name) == getattr(_parse("evaluate"), name), name
    # ... and the decoding default is the library's and the training loop's eval default.
    from vlm_sweep.config.schema import EvalConfig

    assert _parse("generate").max_new_tokens == _parse("evaluate").max_new_tokens == SamplingConfig().max_new_tokens
    assert SamplingConfig().max_new_tokens == EvalConfig().max_new_tokens


def test_output_dir_keeps_exports_old_spelling():
    assert _parse("export", "--output", "x").output_dir == _parse("export", "--output-dir", "x").output_dir == "x"
    assert set(FLAGS["output_dir"].names) == {"--output-dir", "--output"}


def test_the_old_module_paths_run_the_same_commands():
    from vlm_sweep import evaluate, export, generate
    from vlm_sweep.cli import evaluate as new_evaluate, export as new_export, generate as new_generate

    assert (generate.main, evaluate.main, export.main) == (new_generate.main, new_evaluate.main, new_export.main)


@pytest.mark.parametrize("module", ["vlm_sweep.cli.generate", "vlm_sweep.cli.evaluate", "vlm_sweep.cli.export",
                                    "vlm_sweep.evaluate"])
def test_a_missing_checkpoint_is_one_line_and_exit_2(module, tmp_path):
    missing = tmp_path / "no_such_run"
    argv = ["--checkpoint", str(missing)] + (["--output-dir", str(tmp_path / "out")] if "export" in module else [])
    proc = subprocess.run([sys.executable, "-m", module, *argv], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: checkpoint not found: {missing} (expected a run, "
                                                f"checkpoints, step_<N>, model or export dir, or a hub id)"]


@pytest.mark.parametrize("module", ["vlm_sweep.cli.generate", "vlm_sweep.cli.evaluate", "vlm_sweep.cli.export"])
def test_a_run_dir_without_a_checkpoint_is_one_line_and_exit_2(module, tmp_path):
    """A run killed before its first save has a dir (Hydra's .hydra/, a log) but nothing to load."""
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("seed: 42\n")
    argv = ["--checkpoint", str(run)] + (["--output-dir", str(tmp_path / "out")] if "export" in module else [])
    proc = subprocess.run([sys.executable, "-m", module, *argv], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: no checkpoint or model in {run} (a run dir that has not "
                                                "saved a checkpoint yet, or a directory that is not a model)"]


def test_evaluate_composes_from_the_installed_package_not_the_working_directory(tmp_path, monkeypatch):
    from vlm_sweep.config.paths import conf_dir
    from vlm_sweep.config.compose import compose_eval_config

    monkeypatch.chdir(tmp_path)  # nowhere near a conf/
    assert (conf_dir() / "config.yaml").is_file()
    assert conf_dir() == (ROOT / "conf").resolve()  # a source checkout: the repository's own tree
    cfg = compose_eval_config(["dataset.split=test"], {"dataset": {"name": "synthetic_receipts"}})
    assert (cfg.dataset.name, cfg.dataset.split) == ("synthetic_receipts", "test")
