"""The run-directory and checkpoint layout: every file name, in one place.

::

    <run dir>/                     one Hydra job
      config.yaml                  the composed config (secrets redacted)
      metrics.jsonl                one JSON row per logged step; the tracker backfills from it
      tracking.json                {"run_id", "uri"}: the MLflow run a resume continues
      job_status.json              RUNNING / FINISHED / FAILED ...: the sweep callback and report read it
      launch.log                   Hydra's job log (``<job name>.log``)
      sharding_rank<R>.json        FSDP: what rank R holds
      checkpoints/
        LATEST, BEST               pointers: the name of a step dir, one line
        step_<N>/                  model/ training_state/ config.yaml manifest.json [consolidated/]
        .tmp_step_<N>/             a checkpoint being written
    <sweep dir>/mlflow_parent.json the sweep's MLflow parent run
    <eval dir>/summary.json, predictions.jsonl

Other modules name these files only through this module: existing runs must keep resuming,
so a name is spelled once, here, and not retyped (and mistyped) in a reader and a writer.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Tuple, Union

# -- run dir --
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
TRACKING = "tracking.json"
JOB_STATUS = "job_status.json"
JOB_NAME = "launch"  # Hydra names the job (and its log) after the script, launch.py
CHECKPOINTS = "checkpoints"
EVALUATIONS = "evaluations"  # `evaluate` results for the run's checkpoints (outside them: keep_last prunes those)
SWEEP_PARENT = "mlflow_parent.json"
# -- checkpoints dir --
LATEST = "LATEST"
BEST = "BEST"
STEP_PREFIX = "step_"
TMP_PREFIX = ".tmp_"
STALE_TMP_GLOB = f"{TMP_PREFIX}{STEP_PREFIX}*"
# -- one checkpoint (step dir) --
MODEL = "model"
CONSOLIDATED = "consolidated"
TRAINING_STATE = "training_state"
TRAINER_STATE = "trainer_state.json"
TRAINABLE = "trainable.pt"
WEIGHTS_MAP = "weights_in_model.json"
OPTIMIZER = "optimizer.pt"
SCHEDULER = "scheduler.pt"
MANIFEST = "manifest.json"
# -- exports and evaluations --
BASE_MODEL = "BASE_MODEL"
EVAL_SUMMARY = "summary.json"
EVAL_PREDICTIONS = "predictions.jsonl"
EVAL_EXAMPLES = "examples"  # images of the records `evaluate --examples N` shows

_STEP_DIR = re.compile(rf"^{STEP_PREFIX}(\d+)$")
PathLike = Union[str, "os.PathLike[str]"]


def atomic_write(path: PathLike, data: Union[str, bytes]) -> None:
    """Replace ``path`` so a reader (or a kill) sees the old content or the new, never half.

    Written to a uniquely named temp file in the same dir (same file system, so the rename is
    atomic; unique, so two writers never share one), fsynced, then ``os.replace``d. Created
    with ``os.open(..., 0o666)``, so its mode honours the umask as ``open`` would (mkstemp's
    0600 would hide it from the group). The temp file never outlives a failed write.
    """
    path = Path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def install_build(tmp: Path, dest: Path, state_of: Callable[[Path], str], not_a_build: str) -> None:
    """Move a finished build dir ``tmp`` to ``dest`` atomically, whoever else is building it.

    ``state_of(dest)`` says what ``dest`` holds: 'current' (an identical build: a concurrent
    builder won the race, its copy is used), 'stale' (an older version's: replaced) or
    'absent' (no build marker: ``FileExistsError(not_a_build)``, nothing is overwritten).
    """
    try:
        os.rename(tmp, dest)  # atomic; also replaces an *empty* directory
        return
    except OSError:
        state = state_of(dest)
    if state == "current":
        return
    if state == "absent":
        raise FileExistsError(not_a_build)
    stale = tmp.with_name(tmp.name.replace(".tmp-", ".stale-"))
    try:
        os.rename(dest, stale)
    except FileNotFoundError:
        pass  # a concurrent builder already moved it
    try:
        os.rename(tmp, dest)
    except OSError:
        if state_of(dest) != "current":
            raise
    finally:
        shutil.rmtree(stale, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    """Make a rename durable (best effort: some file systems refuse a dir fsync)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def step_name(step: int) -> str:
    """``step_<N>``: the name of checkpoint ``step`` in a checkpoints dir."""
    return f"{STEP_PREFIX}{step}"


def step_of(name: str) -> Optional[int]:
    """N for a ``step_<N>`` name, else None (``step_6.tmp``, ``step_x`` are not checkpoints)."""
    match = _STEP_DIR.match(name)
    return int(match.group(1)) if match else None


def tmp_name(name: str) -> str:
    """``.tmp_step_<N>``: where checkpoint ``name`` is assembled before its rename."""
    return f"{TMP_PREFIX}{name}"


def sharding_file(rank: int) -> str:
    return f"sharding_rank{rank}.json"


def eval_dir_name(dataset: str, split: str) -> str:
    """The name of an evaluation's default output dir (see ``default_eval_dir``)."""
    return f"eval_{dataset}_{split}"


def default_eval_dir(model_dir: Path, step_dir: Optional[Path], dataset: str, split: str) -> Path:
    """Where ``evaluate`` writes by default.

    A run's checkpoint: ``<run>/evaluations/<step_N>_eval_<dataset>_<split>``, beside the checkpoints
    rather than in them, so ``checkpoint.keep_last`` pruning the step (the run goes on, or resumes)
    never takes the results with it. Anything else (an export, a model dir): inside that dir.
    """
    name = eval_dir_name(dataset, split)
    if step_dir is not None and step_dir.parent.name == CHECKPOINTS:
        return RunDir(step_dir.parent.parent).evaluations / f"{step_dir.name}_{name}"
    return (step_dir or model_dir) / name


def read_pointer(root: PathLike, which: str) -> Optional[str]:
    """The step-dir name a LATEST/BEST pointer in ``root`` holds ('' if empty), None if unreadable."""
    try:
        return (Path(root) / which).read_text().strip()
    except OSError:
        return None


def write_pointer(root: PathLike, which: str, name: str) -> None:
    """Point LATEST/BEST in ``root`` at step dir ``name``, atomically (a resume reads it)."""
    atomic_write(Path(root) / which, name + "\n")


def _under(*parts: str) -> property:
    """A read-only Path property ``self.path / parts...``: the layout below reads as a table."""
    return property(lambda self: self.path.joinpath(*parts))


@dataclass(frozen=True)
class CheckpointDir:
    """One ``step_<N>`` dir (or its ``.tmp_`` twin while it is written): where each part lives."""

    path: Path

    model = _under(MODEL)  # PEFT adapter or full HF model, plus the processor
    consolidated = _under(CONSOLIDATED)  # checkpoint.save_consolidated: the merged model
    config = _under(CONFIG)
    manifest = _under(MANIFEST)
    state = _under(TRAINING_STATE)
    trainer_state = _under(TRAINING_STATE, TRAINER_STATE)
    trainable = _under(TRAINING_STATE, TRAINABLE)
    weights_map = _under(TRAINING_STATE, WEIGHTS_MAP)
    optimizer = _under(TRAINING_STATE, OPTIMIZER)
    scheduler = _under(TRAINING_STATE, SCHEDULER)

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    def rank_state(self, rank: int) -> Path:
        """Per-rank RNG and data position."""
        return self.path / TRAINING_STATE / f"rank_{rank}.pt"


@dataclass(frozen=True)
class RunDir:
    """One run's dir: where each of its records lives."""

    path: Path

    config = _under(CONFIG)
    metrics = _under(METRICS)
    tracking = _under(TRACKING)
    job_status = _under(JOB_STATUS)
    checkpoints = _under(CHECKPOINTS)
    evaluations = _under(EVALUATIONS)

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    def log(self, job_name: str = JOB_NAME) -> Path:
        """Hydra's job log, named after the job (``launch.log`` for launch.py)."""
        return self.path / f"{job_name}.log"

    def sharding(self, rank: int) -> Path:
        return self.path / sharding_file(rank)

    def checkpoint_dir(self, step: int) -> Path:
        return self.checkpoints / step_name(step)

    def latest(self) -> Optional[Path]:
        """The step dir LATEST names (unverified: see training.checkpoint_select), or None."""
        return _pointed(self.checkpoints, LATEST)

    def best(self) -> Optional[Path]:
        """The step dir BEST names (unverified), or None."""
        return _pointed(self.checkpoints, BEST)


def _pointed(root: Path, which: str) -> Optional[Path]:
    name = read_pointer(root, which)
    return root / name if name else None


def find_model_dir(path: PathLike) -> Tuple[Path, Optional[Path]]:
    """(model dir, step dir or None) for a run dir, checkpoints dir, step dir, model dir or export.

    A run or checkpoints dir follows LATEST; a step dir holds its model in ``model/``; a
    ``model/`` or ``consolidated/`` dir of a step dir has that step dir as its parent; an
    export (or a hub-style model dir) is its own model dir and has no step dir.
    """
    p = Path(path)
    for root in (p / CHECKPOINTS, p):
        if (root / LATEST).exists():
            p = root / (read_pointer(root, LATEST) or "")
            break
    if (p / MODEL).is_dir():
        return p / MODEL, p
    return p, (p.parent if (p.parent / TRAINING_STATE).is_dir() else None)
