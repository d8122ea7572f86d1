"""Local JSON / JSONL / parquet files as splits, with bad lines named by file and line.

A local source is one data file (the one split ``train_split``) or a directory of split files
named ``<split>.<ext>`` (``train.jsonl``, ``validation.jsonl``, ``test.parquet``; a
``-00000-of-00002`` shard suffix is allowed). A directory with no data file at its top level
(a hub repo's layout) is left to datasets. A data file named by no split the run can read is a
one-line ``DatasetLoadError`` (``check_split_names``).

A JSONL line that is not a JSON object is a one-line ``DatasetLoadError`` naming its file
and line, or, under ``dataset.on_bad_record=skip``, skipped with a warning naming it (the
good lines are then parsed with pyarrow as datasets' json builder would). Rows that do not
share one schema (a ``content`` that is a string in one row and a list in another) are kept
as their JSON text and decoded per record (``decode_row``). Each row's file and line are kept
(``FILE_COLUMN``, ``LINE_COLUMN``) so records are named by where they are in the user's files.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from vlm_sweep.errors import DatasetLoadError

log = logging.getLogger(__name__)

# A local data file is one split, read by the builder for its extension.
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# Columns added at load time: the file and the line where each row of a local JSON file starts.
FILE_COLUMN, LINE_COLUMN = "__vlm_sweep_source_file__", "__vlm_sweep_source_line__"
# Rows of a JSON file that do not share one schema are kept as their JSON text in this column.
RAW_COLUMN = "__vlm_sweep_json_row__"
# Split names a directory's data files may always have, besides the configured ones.
STANDARD_SPLITS = ("train", "validation", "test")
_SHARD_SUFFIX = re.compile(r"-\d{5}-of-\d{5}$")
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


def split_files(directory: Path) -> Dict[str, List[Path]]:
    """split -> its data files, for a directory of split files; empty if none is at its top level."""
    found: Dict[str, List[Path]] = {}
    if directory.is_dir():
        for path in sorted(directory.iterdir()):
            # Hidden files (markers such as ``.complete.json``) are no data, as for datasets.
            if path.is_file() and path.suffix.lower() in FILE_BUILDERS and not path.name.startswith("."):
                found.setdefault(_SHARD_SUFFIX.sub("", path.stem), []).append(path)
    return found


def check_split_names(found: Dict[str, List[Path]], dataset_cfg: Any) -> None:
    """A data file named by no split the run can read is a one-line error naming it and the names expected.

    An error, not a warning: such a file (``val.jsonl``, ``dev.jsonl``, ``eval.jsonl``) is almost
    always a misnamed validation file. Ignoring it would carve validation out of train instead, so
    the run would train and validate on other data than the user meant, and a warning scrolls away
    in a training log; the error costs a rename (or ``dataset.val_split=<name>``) before any model loads.
    """
    names = list(dict.fromkeys(name for name in (dataset_cfg.train_split, dataset_cfg.val_split,
                                                 getattr(dataset_cfg, "split", None), *STANDARD_SPLITS) if name))
    for split, files in found.items():
        if split not in names:
            raise DatasetLoadError(
                f"{files[0]}: not a split file name: data files in dataset.path are named by split "
                f"({', '.join(name + '.jsonl' for name in names)}; or .json / .parquet); rename it "
                f"(e.g. to {dataset_cfg.val_split or 'validation'}.jsonl) or set dataset.val_split={split}")


def _local_layout(dataset_cfg: Any) -> Optional[Dict[str, List[Path]]]:
    """split -> files of a local data file (the one split ``train_split``) or directory of split files
    (names checked); None for any other source."""
    local = Path(str(dataset_cfg.path))
    if local.is_file():
        return {dataset_cfg.train_split: [local]}
    found = split_files(local)
    if not found:
        return None
    check_split_names(found, dataset_cfg)
    return found


def local_splits(dataset_cfg: Any) -> Optional[List[str]]:
    """The splits of a local data file or directory of split files (names checked); None for other sources."""
    layout = _local_layout(dataset_cfg)
    return None if layout is None else list(layout)


def local_split_files(dataset_cfg: Any, split: str) -> Optional[List[Path]]:
    """The files holding ``split`` of a local file or directory of split files; None for other sources."""
    layout = _local_layout(dataset_cfg)
    if layout is None or split in layout:
        return None if layout is None else layout[split]
    if Path(str(dataset_cfg.path)).is_file():
        raise ValueError(f"Unknown split {split!r}: a data file is the one split {dataset_cfg.train_split!r}")
    have = ", ".join(path.name for files in layout.values() for path in files)
    raise ValueError(f"no {split!r} split file in it (expected {split}.jsonl, .json or .parquet; found {have})")


def load_local(files: List[Path], dataset_cfg: Any, split: str) -> Any:
    """``split`` from its local data files, each row's file and line kept (JSON files), bad lines handled."""
    import datasets
    import numpy as np

    parts = []
    for path in files:
        loaded, lines = load_file(path, dataset_cfg.on_bad_record, split)
        if lines is not None and len(lines) == len(loaded):
            loaded = loaded.add_column(LINE_COLUMN, np.asarray(lines, dtype=np.int64))
            loaded = loaded.add_column(FILE_COLUMN, [str(path)] * len(loaded))
        parts.append(loaded)
    if len(parts) == 1:
        return parts[0]
    try:
        return datasets.concatenate_datasets(parts)
    except ValueError as err:
        raise DatasetLoadError(f"the {split!r} files {[str(p) for p in files]} do not share one schema: "
                               f"{root_cause(err)}") from None


def load_file(local: Path, on_bad_record: str, split: str) -> Tuple[Any, Optional[List[int]]]:
    """(``local`` as ``split``, line of each row or None); bad JSONL lines named, or skipped under ``skip``."""
    import datasets

    builder = FILE_BUILDERS.get(local.suffix.lower())
    if builder is None:
        raise ValueError(f"unsupported data file type {local.suffix!r}; use {sorted(FILE_BUILDERS)}")
    bad: Dict[int, str] = {}
    try:
        with quiet_json_builder():
            loaded = datasets.load_dataset(builder, data_files={split: str(local)}, split=split)
    except (datasets.exceptions.DatasetGenerationError, ValueError) as err:
        # ValueError: datasets' json builder lets pandas' errors through (e.g. a bad line among rows
        # that do not share one schema), so those are read here too.
        if builder != "json":
            raise DatasetLoadError(f"could not load {local}: {root_cause(err)}") from None
        loaded, bad = _load_json_rows(local, on_bad_record, split)
    return loaded, (_row_lines(local, bad) if builder == "json" else None)


def _load_json_rows(local: Path, on_bad_record: str, split: str) -> Tuple[Any, Dict[int, str]]:
    """(dataset, bad lines skipped) of a JSON/JSONL file datasets' builder could not read."""
    if _is_json_array(local):
        try:
            items = json.loads(local.read_text(encoding="utf-8"))
        except ValueError:
            raise DatasetLoadError(_json_error(local) or f"could not load {local}: invalid JSON") from None
        return _rows_dataset([json.dumps(item).encode() for item in items], local, split), {}
    bad = _bad_json_lines(local)
    if bad:
        line, reason = next(iter(bad.items()))
        if on_bad_record != "skip":
            more = f" (and {len(bad) - 1} more bad line(s))" if len(bad) > 1 else ""
            raise DatasetLoadError(f"{local}:{line}: {reason}{more}; fix it, or set dataset.on_bad_record=skip "
                                   f"to skip bad lines") from None
        for line, reason in list(bad.items())[:_MAX_LOGGED_LINES]:
            log.warning("skipping bad record %s:%d: %s", local, line, reason)
        log.warning("%s: skipped %d bad line(s) that are not JSON objects", local, len(bad))
    return _json_lines_dataset(local, bad, split), bad


def decode_row(record: Dict[str, Any]) -> Dict[str, Any]:
    """The record as written: a row kept as JSON text (``RAW_COLUMN``) decoded; others unchanged."""
    if RAW_COLUMN not in record:
        return record
    value = json.loads(record.pop(RAW_COLUMN))
    if not isinstance(value, dict):
        raise ValueError(f"not a JSON object (a {type(value).__name__})")
    return value


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
    """The good lines of a JSONL file as a dataset."""
    with open(path, "rb") as f:
        good = [raw.rstrip(b"\r\n") + b"\n" for number, raw in enumerate(f, 1)
                if raw.strip() and number not in bad]
    return _rows_dataset(good, path, split)


def _rows_dataset(rows: List[bytes], path: Path, split: str) -> Any:
    """JSON object rows parsed as datasets' json builder does (pyarrow); rows that do not share one
    schema are kept as their JSON text (``RAW_COLUMN``), each decoded when its record is built."""
    import datasets
    import pyarrow as pa
    import pyarrow.json as paj
    from datasets.table import InMemoryTable

    if not rows:
        raise DatasetLoadError(f"{path}: no line is a JSON object")
    block = max(1 << 20, 2 * max(map(len, rows)))
    try:
        table = paj.read_json(io.BytesIO(b"".join(row.rstrip(b"\r\n") + b"\n" for row in rows)),
                              read_options=paj.ReadOptions(block_size=block))
    except pa.ArrowInvalid as err:
        log.info("%s: rows do not share one schema (%s); each row is decoded on its own",
                 path, str(err).splitlines()[0])
        table = pa.table({RAW_COLUMN: [row.decode("utf-8").strip() for row in rows]})
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
