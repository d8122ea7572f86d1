"""Local JSON / JSONL / parquet files as one split, with bad lines named by file and line.

A JSONL line that is not a JSON object is a one-line ``DatasetLoadError`` naming its file
and line, or, under ``dataset.on_bad_record=skip``, skipped with a warning naming it (the
good lines are then parsed with pyarrow as datasets' json builder would). Each row's line
number is kept so records can be named by where they are in the user's file.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from vlm_sweep.errors import DatasetLoadError

log = logging.getLogger(__name__)

# A local data file is one split, read by the builder for its extension.
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# Bad JSONL lines named one by one in the log under ``skip`` (the rest are counted).
_MAX_LOGGED_LINES = 50


def root_cause(err: BaseException) -> str:
    """The first line of the innermost cause (datasets wraps the parser's error)."""
    while err.__cause__ is not None:
        err = err.__cause__
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


@contextlib.contextmanager
def quiet_json_builder() -> Iterator[None]:
    """Silence datasets' own "Failed to load JSON" log line: the DatasetLoadError says it in one line."""
    logger = logging.getLogger("datasets.packaged_modules.json.json")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def load_file(local: Path, dataset_cfg: Any, split: str) -> Tuple[Any, Optional[List[int]]]:
    """(split, line of each row or None) of a local data file; bad JSONL lines named or skipped."""
    import datasets

    builder = FILE_BUILDERS.get(local.suffix.lower())
    if builder is None:
        raise ValueError(f"unsupported data file type {local.suffix!r}; use {sorted(FILE_BUILDERS)}")
    bad: Dict[int, str] = {}
    try:
        with quiet_json_builder():
            loaded = datasets.load_dataset(builder, data_files={dataset_cfg.train_split: str(local)}, split=split)
    except datasets.exceptions.DatasetGenerationError as err:
        if builder != "json" or _is_json_array(local) or not (bad := _bad_json_lines(local)):
            raise DatasetLoadError(_json_error(local) or f"could not load {local}: {root_cause(err)}") from None
        line, reason = next(iter(bad.items()))
        if dataset_cfg.on_bad_record != "skip":
            more = f" (and {len(bad) - 1} more bad line(s))" if len(bad) > 1 else ""
            raise DatasetLoadError(f"{local}:{line}: {reason}{more}; fix it, or set dataset.on_bad_record=skip "
                                   f"to skip bad lines") from None
        if split != dataset_cfg.train_split:
            raise ValueError(f"Unknown split {split!r}: a data file is the one split {dataset_cfg.train_split!r}")
        for line, reason in list(bad.items())[:_MAX_LOGGED_LINES]:
            log.warning("skipping bad record %s:%d: %s", local, line, reason)
        log.warning("%s: skipped %d bad line(s) that are not JSON objects", local, len(bad))
        loaded = _json_lines_dataset(local, bad, split)
    return loaded, (_row_lines(local, bad) if builder == "json" else None)


def _is_json_array(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"[")


def _json_error(path: Path) -> Optional[str]:
    """``file:line: reason`` of the first syntax error of a JSON (array) or JSONL file, if any."""
    if not path.suffix.lower().startswith(".json"):
        return None
    if not _is_json_array(path):
        bad = _bad_json_lines(path)
        return next((f"{path}:{line}: {reason}" for line, reason in bad.items()), None)
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        return f"{path}:{getattr(err, 'lineno', '?')}: invalid JSON ({getattr(err, 'msg', err)})"
    return None


def bad_file_line(dataset_cfg: Any) -> Optional[str]:
    """For a directory whose split failed to load: the first bad line of its JSON data files."""
    try:
        import datasets

        builder = datasets.load_dataset_builder(str(dataset_cfg.path), name=dataset_cfg.subset)
        files = [Path(f) for fs in (builder.config.data_files or {}).values() for f in fs]
        return next((e for e in map(_json_error, files) if e), None)
    except Exception:  # noqa: BLE001 - best effort: the caller falls back to the parser's message
        return None


def _bad_json_lines(path: Path) -> Dict[int, str]:
    """line -> why, for every non-blank line of a JSONL file that is not one JSON object."""
    bad: Dict[int, str] = {}
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                value = json.loads(raw)
            except json.JSONDecodeError as err:
                bad[number] = f"invalid JSON ({err.msg} at column {err.colno})"
            except ValueError as err:  # not UTF-8
                bad[number] = f"invalid JSON ({err})"
            else:
                if not isinstance(value, dict):
                    bad[number] = f"not a JSON object (a {type(value).__name__})"
    return bad


def _json_lines_dataset(path: Path, bad: Dict[int, str], split: str) -> Any:
    """The good lines of a JSONL file as a dataset, parsed as datasets' json builder does (pyarrow)."""
    import datasets
    import pyarrow as pa
    import pyarrow.json as paj
    from datasets.table import InMemoryTable

    with open(path, "rb") as f:
        good = [raw.rstrip(b"\r\n") + b"\n" for number, raw in enumerate(f, 1)
                if raw.strip() and number not in bad]
    if not good:
        raise DatasetLoadError(f"{path}: no line is a JSON object")
    block = max(1 << 20, 2 * max(map(len, good)))
    try:
        table = paj.read_json(io.BytesIO(b"".join(good)), read_options=paj.ReadOptions(block_size=block))
    except pa.ArrowInvalid as err:
        raise DatasetLoadError(f"could not load {path}: {str(err).splitlines()[0]}") from None
    return datasets.Dataset(InMemoryTable(table), split=datasets.NamedSplit(split))


def _row_lines(path: Path, bad: Dict[int, str]) -> Optional[List[int]]:
    """The 1-based line where each row of a JSON/JSONL file starts (rows as datasets reads them)."""
    if _is_json_array(path):
        return _array_item_lines(path.read_text(encoding="utf-8"))
    with open(path, "rb") as f:
        return [number for number, raw in enumerate(f, 1) if raw.strip() and number not in bad]


def _array_item_lines(text: str) -> Optional[List[int]]:
    """The line of each item of a top-level JSON array (None if the text is not one)."""
    decoder, lines = json.JSONDecoder(), []
    position, line = text.index("[") + 1, 1 + text.count("\n", 0, text.index("["))
    try:
        while True:
            start = position
            while text[position] in " \t\r\n,":
                position += 1
            line += text.count("\n", start, position)
            if text[position] == "]":
                return lines
            lines.append(line)
            _, end = decoder.raw_decode(text, position)
            line += text.count("\n", position, end)
            position = end
    except (ValueError, IndexError):
        return None
