"""The run-dir layout has one home (rundir.py): its names are pinned, its writes are atomic.

Existing runs resume only while every reader and writer agrees on each file's name, so the
names are spelled in rundir.py alone (a grep over the source checks it) and pinned here.
"""

from __future__ import annotations

import ast
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Iterator, List, Set, Tuple

import pytest

from vlm_sweep import rundir
from vlm_sweep.rundir import CheckpointDir, RunDir, atomic_write, find_model_dir, write_pointer

SRC = Path(rundir.__file__).resolve().parent
# Spelled only in rundir.py: as a whole string, as a path component ("a/LATEST") or as the
# fixed part of an f-string (f"step_{n}" -> "step_").
FILE_NAMES = {
    "metrics.jsonl", "tracking.json", "job_status.json", "mlflow_parent.json", "config.yaml", "launch.log",
    "checkpoints", "LATEST", "BEST", "step_", ".tmp_", ".tmp_step_*", "training_state", "trainer_state.json",
    "trainable.pt", "weights_in_model.json", "optimizer.pt", "scheduler.pt", "manifest.json", "rank_",
    "sharding_rank", "BASE_MODEL", "summary.json", "predictions.jsonl",
}
# Words with other meanings too ("model" is a config key): flagged only when joined onto a path.
DIR_NAMES = {"model", "consolidated"}


def _docstrings(tree: ast.AST) -> Set[int]:
    nodes = [n for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                                          ast.AsyncFunctionDef))]
    return {id(n.body[0].value) for n in nodes
            if n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}


def _spelled_names(path: Path) -> Iterator[Tuple[int, str]]:
    """(line, literal) of each run-dir name the module spells outside docstrings and comments."""
    tree = ast.parse(path.read_text(), str(path))
    skip = _docstrings(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            if node.value in FILE_NAMES or FILE_NAMES & set(node.value.split("/")):
                yield node.lineno, node.value
        elif (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div)
              and isinstance(node.right, ast.Constant) and node.right.value in DIR_NAMES):
            yield node.lineno, f"/ {node.right.value!r}"


def test_no_module_but_rundir_spells_a_run_dir_file_name():
    found: List[str] = []
    for path in sorted(SRC.rglob("*.py")):
        if path == SRC / "rundir.py" or "conf" in path.relative_to(SRC).parts:
            continue
        found += [f"{path.relative_to(SRC)}:{line}: {text!r}" for line, text in _spelled_names(path)]
    assert not found, "use vlm_sweep.rundir instead of spelling these names:\n" + "\n".join(found)


def test_the_grep_sees_a_spelled_name(tmp_path):
    """The check above would catch each way a name used to be typed by hand."""
    module = tmp_path / "m.py"
    module.write_text('"""LATEST in a docstring is prose."""\n'
                      'a = root / "LATEST"\nb = f"step_{n}"\nc = step / "model"\nd = cfg["model"]\n')
    assert [text for _, text in sorted(_spelled_names(module))] == ["LATEST", "step_", "/ 'model'"]


def test_the_layout_existing_runs_resume_from():
    """Renaming any of these strands every run written before: they are the on-disk format."""
    run = RunDir("run")
    assert (run.config, run.metrics, run.tracking, run.job_status, run.log()) == (
        Path("run/config.yaml"), Path("run/metrics.jsonl"), Path("run/tracking.json"),
        Path("run/job_status.json"), Path("run/launch.log"))
    assert run.checkpoint_dir(30) == Path("run/checkpoints/step_30")
    ck = CheckpointDir("s")
    assert [p.as_posix() for p in (ck.model, ck.consolidated, ck.config, ck.manifest, ck.trainer_state,
                                   ck.trainable, ck.weights_map, ck.optimizer, ck.scheduler, ck.rank_state(1))] == [
        "s/model", "s/consolidated", "s/config.yaml", "s/manifest.json", "s/training_state/trainer_state.json",
        "s/training_state/trainable.pt", "s/training_state/weights_in_model.json",
        "s/training_state/optimizer.pt", "s/training_state/scheduler.pt", "s/training_state/rank_1.pt"]
    assert (rundir.LATEST, rundir.BEST, rundir.SWEEP_PARENT) == ("LATEST", "BEST", "mlflow_parent.json")
    assert [rundir.step_of(n) for n in ("step_7", "step_7.tmp", "step_x", ".tmp_step_7")] == [7, None, None, None]


def test_pointers_are_one_line_naming_a_step_dir(tmp_path):
    run = RunDir(tmp_path)
    assert run.latest() is None and run.best() is None
    run.checkpoints.mkdir()
    write_pointer(run.checkpoints, rundir.LATEST, "step_4")
    write_pointer(run.checkpoints, rundir.BEST, "step_2")
    assert (run.checkpoints / "LATEST").read_text() == "step_4\n"  # what older versions read and wrote
    assert (run.latest(), run.best()) == (run.checkpoints / "step_4", run.checkpoints / "step_2")


# -- atomic_write ----------------------------------------------------------------------------


def _leftovers(directory: Path, keep: str) -> List[str]:
    return sorted(p.name for p in directory.iterdir() if p.name != keep)


def test_atomic_write_replaces_text_and_bytes(tmp_path):
    target = tmp_path / "job_status.json"
    atomic_write(target, "old\n")
    atomic_write(target, "néw\n")
    assert target.read_text(encoding="utf-8") == "néw\n"
    atomic_write(target, b"\x00\xffbytes")
    assert target.read_bytes() == b"\x00\xffbytes"
    assert _leftovers(tmp_path, target.name) == []


# A child process whose file-size limit stops the write a few KB in (EFBIG, as a full disk
# would stop it): the real failure mid-write, without touching this process's limits.
_FAIL_MID_WRITE = """
import resource, signal, sys
from vlm_sweep.rundir import atomic_write
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    atomic_write(sys.argv[1], "x" * 100_000)
except OSError as err:
    print(type(err).__name__, err.errno)
    sys.exit(3)
"""


def test_a_write_that_fails_midway_leaves_the_old_file_and_no_temp_file(tmp_path):
    target = tmp_path / "LATEST"
    atomic_write(target, "step_2\n")
    done = subprocess.run([sys.executable, "-c", _FAIL_MID_WRITE, str(target)], capture_output=True, text=True)
    assert done.returncode == 3, done.stderr  # the write did fail, with an OSError
    assert target.read_text() == "step_2\n"
    assert _leftovers(tmp_path, target.name) == []


def test_a_failed_replace_removes_its_temp_file(tmp_path):
    target = tmp_path / "tracking.json"
    (target / "in_the_way").mkdir(parents=True)  # a dir where the file goes: os.replace refuses
    with pytest.raises(OSError):
        atomic_write(target, "{}")
    assert _leftovers(tmp_path, target.name) == []


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_atomic_write_honours_the_umask(tmp_path, umask):
    target = tmp_path / "BEST"
    target.write_text("step_1\n")
    os.chmod(target, 0o600)  # the new file's mode comes from the umask, not the old file
    old = os.umask(umask)
    try:
        atomic_write(target, "step_2\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask


# -- find_model_dir --------------------------------------------------------------------------


@pytest.fixture()
def run_dir(tmp_path) -> Path:
    """A run with two checkpoints, LATEST naming the older one (a fallback left it so)."""
    root = tmp_path / "run" / "checkpoints"
    for step in (2, 4):
        (root / f"step_{step}" / "model").mkdir(parents=True)
        (root / f"step_{step}" / "model" / "adapter_config.json").write_text("{}")
        (root / f"step_{step}" / "training_state").mkdir()
        (root / f"step_{step}" / "config.yaml").write_text("model: {}\n")
    (root / "step_2" / "consolidated").mkdir()
    (root / "step_2" / "consolidated" / "config.json").write_text("{}")
    (root / "LATEST").write_text("step_2\n")
    return tmp_path / "run"


def test_find_model_dir_follows_latest_from_a_run_or_checkpoints_dir(run_dir):
    step = run_dir / "checkpoints" / "step_2"
    assert find_model_dir(run_dir) == (step / "model", step)
    assert find_model_dir(str(run_dir / "checkpoints")) == (step / "model", step)


def test_find_model_dir_of_a_step_dir_and_of_the_dirs_inside_one(run_dir):
    step = run_dir / "checkpoints" / "step_4"
    assert find_model_dir(step) == (step / "model", step)
    assert find_model_dir(step / "model") == (step / "model", step)
    consolidated = run_dir / "checkpoints" / "step_2" / "consolidated"
    assert find_model_dir(consolidated) == (consolidated, consolidated.parent)


def test_find_model_dir_of_an_export_has_no_step_dir(tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    (export / "config.json").write_text("{}")
    (export / "model.safetensors").write_bytes(b"")
    assert find_model_dir(export) == (export, None)
