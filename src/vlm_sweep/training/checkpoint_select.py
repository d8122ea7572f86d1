"""Which checkpoint to resume from, and which to keep: LATEST/BEST pointers, fallback, pruning.

Every choice verifies the dir against its manifest (checkpoint_manifest): an incomplete or
corrupt newest checkpoint falls back to the newest older one that verifies, with one warning
line that says what is wrong; only ``step_<N>`` dirs count (``step_6.tmp``, ``step_x`` are
ignored). A deleted LATEST does not restart a run from zero while complete checkpoints exist.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, List, Optional, Tuple

from vlm_sweep.rundir import BEST, CHECKPOINTS, LATEST, STALE_TMP_GLOB, read_pointer, step_of, write_pointer
from vlm_sweep.training.checkpoint_manifest import CheckpointError, verify_checkpoint

log = logging.getLogger(__name__)


def step_dirs(root: Path) -> List[Tuple[int, Path]]:
    """(step, dir) of every ``step_<N>`` dir under ``root``, newest first; other names are ignored."""
    if not Path(root).is_dir():
        return []
    found = [(step, p) for p in Path(root).iterdir() if (step := step_of(p.name)) is not None and p.is_dir()]
    return sorted(found, key=lambda item: item[0], reverse=True)


def latest_checkpoint(checkpoint_root: Path) -> Optional[Path]:
    """The checkpoint to resume from: LATEST's if it verifies, else the newest ``step_<N>`` that does.

    None when the dir holds no checkpoint at all (a fresh start). A fallback is announced in
    one warning line naming what is wrong; when nothing verifies, CheckpointError.
    """
    root = Path(checkpoint_root)
    named, steps = read_pointer(root, LATEST), step_dirs(root)
    if named is None and not steps:
        return None
    problems = []
    if named is not None:
        problem = verify_checkpoint(root / named) if named else "it is empty"
        if problem is None:
            return root / named
        problems.append(f"LATEST names {named or '(nothing)'}, but {problem}")
    else:
        problems.append(f"{root / LATEST} is missing")
    for _, path in steps:
        if path.name == named:
            continue
        problem = verify_checkpoint(path)
        if problem is None:
            log.warning("checkpoint: %s; resuming from %s, the newest complete checkpoint",
                        "; ".join(problems), path)
            return path
        problems.append(f"{path.name}: {problem}")
    raise CheckpointError(f"no usable checkpoint in {root} ({'; '.join(problems)}); move the dir away or set "
                          f"checkpoint.resume=none to start from scratch")


def best_checkpoint(checkpoint_root: Path) -> Optional[Path]:
    """BEST's checkpoint, or None. A BEST naming a missing or incomplete dir is removed (one warning)."""
    root = Path(checkpoint_root)
    named = read_pointer(root, BEST)
    if named is None:
        return None
    problem = verify_checkpoint(root / named, checksums=False) if named else "it is empty"
    if problem is None:
        return root / named
    log.warning("checkpoint: BEST names %s, but %s; BEST removed (the next better checkpoint sets it again)",
                named or "(nothing)", problem)
    (root / BEST).unlink(missing_ok=True)
    return None


def _is_checkpoints_root(path: Path) -> bool:
    return (path / LATEST).exists() or bool(step_dirs(path))


def resolve_resume(checkpoint_cfg: Any, checkpoint_root: Path) -> Optional[Path]:
    """auto -> the newest verified checkpoint, if any; none -> fresh start (refused where an earlier run left
    complete checkpoints); else that (verified) dir.

    An explicit path may be a checkpoints dir (resolved like auto) or one ``step_<N>`` dir.
    """
    if checkpoint_cfg.resume == "none":
        earlier = [path for _, path in step_dirs(checkpoint_root) if verify_checkpoint(path, checksums=False) is None]
        if earlier:  # a fresh start here would cut the earlier run's metrics and mix its checkpoints with ours
            raise CheckpointError(
                f"checkpoint.resume=none, but {checkpoint_root} holds an earlier run's checkpoints "
                f"({', '.join(p.name for p in earlier[:3])}); start it in another hydra.run.dir, continue it "
                f"(checkpoint.resume=auto), or delete that run dir to start over there")
        return None
    if checkpoint_cfg.resume == "auto":
        return latest_checkpoint(checkpoint_root)
    path = Path(checkpoint_cfg.resume)
    if _is_checkpoints_root(path):
        return latest_checkpoint(path)
    if (path / CHECKPOINTS).is_dir() and _is_checkpoints_root(path / CHECKPOINTS):
        return latest_checkpoint(path / CHECKPOINTS)  # a run dir
    problem = verify_checkpoint(path)
    if problem is not None:
        raise CheckpointError(f"checkpoint.resume={path} is not a usable checkpoint dir: {problem}")
    return path


def previous_checkpoint(root: Path) -> Optional[Path]:
    """The checkpoint a rerun would resume from (cheap checks only), or None."""
    named = read_pointer(root, LATEST)
    if named and (root / named).is_dir():
        return root / named
    for _, path in step_dirs(root):
        if verify_checkpoint(path, checksums=False) is None:
            return path
    return None


def mark_best(root: Path, name: str) -> None:
    """Point BEST at checkpoint ``name`` (atomically)."""
    write_pointer(root, BEST, name)


def is_better(value: float, best: Optional[float], mode: str) -> bool:
    return best is None or (value > best if mode == "max" else value < best)


def prune_checkpoints(root: Path, keep_last: int, keep: str) -> None:
    """Keep ``keep`` plus the newest ``keep_last - 1`` other complete checkpoints, and BEST's.

    Incomplete ``step_<N>`` dirs (failing a size check against their manifest) do not count
    and are removed, as are stale ``.tmp_step_*`` dirs; dirs with other names are left alone.
    """
    root = Path(root)
    for stale in root.glob(STALE_TMP_GLOB):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
    best = best_checkpoint(root)
    protected = {keep} | ({best.name} if best is not None else set())
    survivors = keep_last - 1
    for _, path in step_dirs(root):
        if path.name in protected:
            continue
        problem = verify_checkpoint(path, checksums=False)
        if problem is None and survivors > 0:
            survivors -= 1
            continue
        if problem is not None:
            log.warning("checkpoint: removing incomplete %s (%s)", path, problem)
        shutil.rmtree(path, ignore_errors=True)
