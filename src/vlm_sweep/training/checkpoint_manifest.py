"""Checkpoint integrity: a manifest of every file, and file modes that honour the umask.

``manifest.json`` lists each file of a checkpoint with its size and CRC32. It is written
last, inside the temporary dir, before the dir is renamed into place: a ``step_<N>`` dir
whose files match it is complete. Truncation and missing files show as a size mismatch
(cheap: one ``stat`` per file); bit rot shows as a checksum mismatch (one read).

CRC32 (zlib) runs at memory speed (several GB/s, the GIL released), so checksumming costs a
fraction of writing the same bytes; a cryptographic hash would only add guarantees
against tampering, which a checkpoint dir does not need.

Some writers (safetensors, tempfile) create files 0600 whatever the umask, so a
checkpoint came out partly unreadable to the group; ``apply_umask_modes`` sets every
file to what ``open`` would have made.
"""

from __future__ import annotations

from vlm_sweep.errors import CheckpointError  # noqa: F401 (defined there, re-exported here)

import json
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, Optional

from vlm_sweep.rundir import MANIFEST, TRAINER_STATE as _TRAINER_STATE, TRAINING_STATE

TRAINER_STATE = Path(TRAINING_STATE) / _TRAINER_STATE  # relative to the step dir, as the manifest lists it
_CHUNK = 8 << 20




def _umask_from_proc() -> Optional[int]:
    """The current umask without changing it (Linux >= 4.7), else None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return None


def _umask_at_import() -> int:
    # Setting and restoring the umask is the portable way to read it; done once here, so no
    # other thread can create files under a zero umask later.
    old = os.umask(0)
    os.umask(old)
    return old


_IMPORT_UMASK = _umask_at_import()


def process_umask() -> int:
    """The process umask (read from /proc where possible, else the one at import)."""
    current = _umask_from_proc()
    return _IMPORT_UMASK if current is None else current


def apply_umask_modes(root: Path) -> None:
    """Files 0666 & ~umask, dirs 0777 & ~umask, under ``root`` (itself included)."""
    umask = process_umask()
    file_mode, dir_mode = 0o666 & ~umask, 0o777 & ~umask
    os.chmod(root, dir_mode)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), dir_mode)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), file_mode)


def file_crc32(path: Path) -> str:
    """CRC32 of a file's bytes as 8 hex digits."""
    crc, buffer = 0, bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as fh:
        while True:
            n = fh.readinto(buffer)
            if not n:
                break
            crc = zlib.crc32(view[:n], crc)
    return f"{crc:08x}"


def _checksums(root: Path, names: list) -> list:
    # Threads: file reads and zlib.crc32 release the GIL, so shards are summed in parallel.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1, max(len(names), 1))) as pool:
        return list(pool.map(lambda name: file_crc32(root / name), names))


def _files(root: Path) -> list:
    out = []
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            if rel != MANIFEST:
                out.append(Path(rel).as_posix())
    return sorted(out)


def write_manifest(root: Path) -> int:
    """Record every file under ``root`` (path, size, crc32); returns the total size in bytes."""
    names = _files(root)
    sums = _checksums(root, names)
    files: Dict[str, Dict] = {}
    for name, crc in zip(names, sums):
        files[name] = {"size": (root / name).stat().st_size, "crc32": crc}
    manifest = {"version": 1, "checksum": "crc32", "files": files}
    with open(root / MANIFEST, "w") as fh:
        json.dump(manifest, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    return sum(entry["size"] for entry in files.values())


def read_manifest(root: Path) -> Optional[Dict]:
    """The manifest of a checkpoint dir, or None when it has none (or it is unreadable)."""
    try:
        data = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("files"), dict) else None


def verify_checkpoint(path: Path, checksums: bool = True) -> Optional[str]:
    """What is wrong with checkpoint dir ``path``, or None when it is complete.

    Without a manifest (a checkpoint written before manifests existed) the dir is accepted
    when its trainer_state.json exists. ``checksums=False`` checks presence and sizes only.
    """
    path = Path(path)
    if not path.is_dir():
        return "it does not exist"
    if not (path / MANIFEST).exists():
        if (path / TRAINER_STATE).is_file():
            return None
        return f"no {MANIFEST} and no {TRAINER_STATE.as_posix()} (an incomplete write)"
    manifest = read_manifest(path)
    if manifest is None:
        return f"{MANIFEST} is unreadable"
    files = manifest["files"]
    if TRAINER_STATE.as_posix() not in files:
        return f"{MANIFEST} does not list {TRAINER_STATE.as_posix()}"
    for name, entry in sorted(files.items()):
        try:
            size = (path / name).stat().st_size
        except OSError:
            return f"{name} is missing"
        if size != entry.get("size"):
            return f"{name} has {size} bytes, the manifest says {entry.get('size')} (truncated or overwritten)"
    if checksums:
        names = sorted(files)
        for name, crc in zip(names, _checksums(path, names)):
            if crc != files[name].get("crc32"):
                return f"{name} does not match its checksum (corrupt)"
    return None


def checkpoint_bytes(path: Path) -> int:
    """Total size of a checkpoint dir's files (from its manifest when there is one)."""
    manifest = read_manifest(path)
    if manifest is not None:
        return sum(int(entry.get("size", 0)) for entry in manifest["files"].values())
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
