"""Load a split with HF datasets and turn records into conversations lazily.

Records are decoded on access (images stay encoded in the Arrow table, videos are
decoded from their files when their record is built), so a large data set never
sits decoded in memory. A bad record (corrupt image, missing video, undecodable
JSON, empty answer) raises ``BadRecordError`` naming it, or, with
``dataset.on_bad_record=skip``, yields ``None`` that the collator drops and counts.

Splits are what the source has, narrowed in two generic steps: rows a format
declares unusable (its ``DatasetSpec.row_filter``) are dropped and counted, and when
``dataset.carve_val_fraction`` is set and the source has no ``val_split`` (a local data file
has only train; a directory of split files has the splits its files name) the validation
split is carved out of the train split by a seeded permutation (the same rows on every run
and in every CLI). The log line says which happened.

Records are named by where they are in the SOURCE, whatever carving, row filters and
``max_*_samples`` did: ``name/split[row]`` with the row of the source split (kept in a
column through every ``select``), plus ``(file:line)`` for a local JSON/JSONL file (a
single file or a directory's split file). A
JSONL line that is not a JSON object is a one-line ``DatasetLoadError`` naming its file
and line, or, under ``skip``, skipped with a warning naming it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Container, Dict, List, Optional, Tuple

from vlm_sweep.errors import BadRecordError, DatasetLoadError  # noqa: F401 (re-exported)
from vlm_sweep.hub import download_hint, hub_offline, hub_reachable, looks_like_hub_id
from vlm_sweep.data.json_source import (FILE_COLUMN, LINE_COLUMN, bad_file_line, decode_row, load_local,
                                        local_split_files, local_splits, quiet_json_builder, root_cause)
from vlm_sweep.data.media import VideoFrames, shrink_image, to_rgb
from vlm_sweep.data.formats import Conversation, assistant_texts
from vlm_sweep.data.sets import get_spec

log = logging.getLogger(__name__)

# Seed of the train/validation carve when the config names none (dataset.carve_seed).
DEFAULT_CARVE_SEED = 0
# Column added at load time: the row in the source split (json_source adds a local JSON file's
# file and line columns).
ROW_COLUMN = "__vlm_sweep_source_row__"
_SOURCE_COLUMNS = (ROW_COLUMN, FILE_COLUMN, LINE_COLUMN)


@dataclass
class Sample:
    """One training example: where it came from and its conversation.

    ``conversation`` is None when the reading process already holds the record's encoded
    features (``ConversationDataset.encoded``): the record is then neither read nor decoded.
    """

    record_id: str
    conversation: Optional[Conversation]


def ensure_local_data(dataset_cfg: Any) -> None:
    """Generate a synthetic data set into ``dataset.path`` once, if configured (the format's fixture)."""
    if not dataset_cfg.synthetic:
        return
    get_spec(dataset_cfg.format).write_fixture(dataset_cfg.path, **dict(dataset_cfg.synthetic))


def load_split(dataset_cfg: Any, split: str) -> Any:
    """One split as a ``datasets.Dataset`` (hub id, local dir or local file in the same schema).

    With ``dataset.carve_val_fraction`` set, ``val_split`` names the carved rows and
    ``train_split`` the rest of the source's train split.
    """
    if carves(dataset_cfg) and split in (dataset_cfg.train_split, dataset_cfg.val_split):
        train, val = load_carved_splits(dataset_cfg)
        return val if split == dataset_cfg.val_split else train
    return load_source_split(dataset_cfg, split)


def carves(dataset_cfg: Any) -> bool:
    """Whether validation is carved out of the train split: asked for, and the source has no ``val_split``.

    The splits of a local file or directory of split files are known without loading; for any other
    source (hub id, hub layout) the config's ``carve_val_fraction`` is taken at its word.
    """
    if not dataset_cfg.carve_val_fraction or dataset_cfg.val_split is None:
        return False
    splits = local_splits(dataset_cfg)
    return splits is None or dataset_cfg.val_split not in splits


def source_split(dataset_cfg: Any, split: str) -> str:
    """The split of the source that ``split``'s rows come from (carved splits come from train)."""
    if carves(dataset_cfg) and split in (dataset_cfg.train_split, dataset_cfg.val_split):
        return dataset_cfg.train_split
    return split


def load_carved_splits(dataset_cfg: Any) -> Tuple[Any, Any]:
    """(train, validation) carved from the source's train split, seeded."""
    source = load_source_split(dataset_cfg, dataset_cfg.train_split)
    seed = carve_seed(dataset_cfg)
    train_rows, val_rows = carve_rows(len(source), dataset_cfg.carve_val_fraction, seed)
    log.info("%s: %d train / %d validation rows carved from %r (seed %d): the source has no %r split",
             dataset_cfg.name, len(train_rows), len(val_rows), dataset_cfg.train_split, seed,
             dataset_cfg.val_split)
    return source.select(train_rows), source.select(val_rows)


def load_source_split(dataset_cfg: Any, split: str) -> Any:
    """A split as the source has it, minus the rows its format drops."""
    ensure_local_data(dataset_cfg)
    source = str(dataset_cfg.path)
    local = Path(source)
    if not local.exists():
        if not looks_like_hub_id(source):
            raise DatasetLoadError(f"dataset.path {source!r} does not exist (no such file or directory)")
        if not hub_offline() and not hub_reachable():
            raise DatasetLoadError(
                f"dataset {source!r} is not a local path and the Hugging Face hub is not reachable: "
                f"{download_hint(source, repo_type='dataset')}.")
    import datasets
    import numpy as np

    try:
        files = local_split_files(dataset_cfg, split) if local.exists() else None
        if files is not None:
            loaded = load_local(files, dataset_cfg, split)
        else:
            with quiet_json_builder():
                loaded = datasets.load_dataset(source, name=dataset_cfg.subset, split=split)
    except datasets.exceptions.DatasetGenerationError as err:  # a directory's data file is broken
        raise DatasetLoadError(f"could not load split {split!r} of dataset {source!r}: "
                               f"{bad_file_line(dataset_cfg) or root_cause(err)}") from None
    except (FileNotFoundError, ValueError, ConnectionError) as err:
        # Offline and not in the datasets cache: say how to get it, as for a hub that cannot be reached.
        hint = f"; {download_hint(source, repo_type='dataset')}" if isinstance(err, ConnectionError) else ""
        raise DatasetLoadError(
            f"could not load split {split!r} of dataset {source!r}: {str(err).splitlines()[0]}{hint}"
        ) from err
    loaded = loaded.add_column(ROW_COLUMN, np.arange(len(loaded), dtype=np.int64))
    return drop_unusable_rows(loaded, dataset_cfg.format, f"{dataset_cfg.name}/{split}")


def drop_unusable_rows(hf_split: Any, record_format: str, where: str) -> Any:
    """Apply the format's row filter (if any) without decoding media; log how many rows went."""
    rule = get_spec(record_format).row_filter
    if rule is None:
        return hf_split
    keep: List[bool] = []
    for batch in hf_split.select_columns(list(rule.columns)).with_format("arrow").iter(batch_size=1000):
        keep += rule.keep(batch)
    dropped = len(keep) - sum(keep)
    if dropped == 0:
        return hf_split
    log.warning("%s: dropped %d of %d rows %s", where, dropped, len(keep), rule.reason)
    return hf_split.select([i for i, ok in enumerate(keep) if ok])


def carve_seed(dataset_cfg: Any) -> int:
    """The carve's seed: ``dataset.carve_seed`` if the config has one, else a fixed default.

    Deliberately not the run seed, so a seed sweep trains and validates on the same rows.
    """
    seed = getattr(dataset_cfg, "carve_seed", None)
    return DEFAULT_CARVE_SEED if seed is None else int(seed)


def carve_rows(num_rows: int, fraction: float, seed: int) -> Tuple[List[int], List[int]]:
    """(train rows, validation rows): a seeded, disjoint split; each side keeps source order."""
    import numpy as np

    if num_rows < 2:
        raise DatasetLoadError(f"cannot carve a validation split out of {num_rows} row(s)")
    num_val = min(max(1, round(num_rows * fraction)), num_rows - 1)
    order = np.random.default_rng(seed).permutation(num_rows)
    return sorted(order[num_val:].tolist()), sorted(order[:num_val].tolist())


def _shrink_video(frames: Any, max_side: int) -> Any:
    """Every frame within ``max_side``; the sampling metadata follows the new size."""
    shrunk = [shrink_image(frame, max_side) for frame in frames]
    metadata = dict(getattr(frames, "metadata", None) or {})
    if metadata and shrunk:
        metadata.update(width=shrunk[0].width, height=shrunk[0].height)
    return VideoFrames(shrunk, metadata) if metadata else shrunk


def _as_rgb(image: Any, where: str) -> Any:
    try:
        return to_rgb(image)  # forces the full decode: truncated files fail here
    except Exception as err:
        raise BadRecordError(f"{where}: image cannot be decoded ({err})") from err


class ConversationDataset:
    """Map-style dataset of ``Sample`` built on demand from a HF split."""

    def __init__(self, hf_split: Any, dataset_cfg: Any, split: str) -> None:
        self.hf_split = hf_split
        self.to_conversation = get_spec(dataset_cfg.format).to_conversation
        self.cfg = dataset_cfg
        self.name = f"{dataset_cfg.name}/{source_split(dataset_cfg, split)}"
        self.skip_bad = dataset_cfg.on_bad_record == "skip"
        # Where each row came from (load_source_split's columns; absent for a split built elsewhere).
        # Read per record: materialising a column through a select()'s index mapping is slow.
        columns = [c for c in _SOURCE_COLUMNS if c in hf_split.column_names]
        self._source = hf_split.select_columns(columns) if columns else None
        # Record ids whose model inputs this process already holds (the collator's FeatureCache,
        # linked by build_loaders): such records come back without a conversation.
        self.encoded: Optional[Container[str]] = None

    def __len__(self) -> int:
        return len(self.hf_split)

    def record_id(self, index: int) -> str:
        """``name/split[row]`` by the row in the source split, plus ``(file:line)`` for a JSON file."""
        source = self._source[index] if self._source is not None else {}
        where = f"{self.name}[{source.get(ROW_COLUMN, index)}]"
        line = source.get(LINE_COLUMN)
        return where if line is None else f"{where} ({source.get(FILE_COLUMN, self.cfg.path)}:{line})"

    def build(self, index: int) -> Sample:
        """The sample at ``index``; raises BadRecordError naming the record."""
        where = self.record_id(index)
        try:
            record = self.hf_split[index]
        except Exception as err:  # image decode errors surface on access
            raise BadRecordError(f"{where}: cannot be read ({err})") from err
        for column in _SOURCE_COLUMNS:
            record.pop(column, None)
        try:
            conversation = self.to_conversation(decode_row(record), self.cfg)
        except BadRecordError:
            raise
        except (ValueError, KeyError, TypeError) as err:
            raise BadRecordError(f"{where}: {err}") from err
        max_side = self.cfg.max_image_side
        for turn in conversation:
            for part in turn["content"]:
                if part.get("type") == "image":
                    part["image"] = shrink_image(_as_rgb(part["image"], where), max_side)
                elif part.get("type") == "video" and max_side:
                    part["video"] = _shrink_video(part["video"], max_side)
        if not any(text.strip() for text in assistant_texts(conversation)):
            raise BadRecordError(f"{where}: empty answer")
        return Sample(record_id=where, conversation=conversation)

    def __getitem__(self, index: int) -> Optional[Sample]:
        """For the DataLoader: a record already encoded in this process comes back unread."""
        if self.encoded is not None:
            record_id = self.record_id(index)
            if record_id in self.encoded:
                return Sample(record_id=record_id, conversation=None)
        return self.read(index)

    def read(self, index: int) -> Optional[Sample]:
        """The sample, or None for a bad record under ``on_bad_record=skip``."""
        try:
            return self.build(index)
        except BadRecordError as err:
            if not self.skip_bad:
                raise
            log.warning("skipping bad record: %s", err)
            return None

    def length_hints(self) -> List[int]:
        """Cheap per-record size estimates (text characters) for length grouping.

        Reads only the columns without media, so no image is decoded.
        """
        text_columns = [name for name, feature in self.hf_split.features.items()
                        if not _holds_media(feature) and name not in _SOURCE_COLUMNS]
        table = self.hf_split.select_columns(text_columns)
        return [sum(len(str(v)) for v in row.values()) for row in table]


def _holds_media(feature: Any) -> bool:
    """Whether a (possibly nested) ``datasets`` feature contains images or videos."""
    from datasets import Image, Video

    if isinstance(feature, (Image, Video)):
        return True
    if isinstance(feature, dict):
        return any(_holds_media(f) for f in feature.values())
    if isinstance(feature, (list, tuple)):
        return any(_holds_media(f) for f in feature)
    inner = getattr(feature, "feature", None)
    return inner is not None and _holds_media(inner)


def build_datasets(dataset_cfg: Any) -> Dict[str, ConversationDataset]:
    """Train and (if configured) validation datasets, truncated to max_*_samples."""
    carved = load_carved_splits(dataset_cfg) if carves(dataset_cfg) else None
    out: Dict[str, ConversationDataset] = {}
    for position, (role, split, limit) in enumerate((
        ("train", dataset_cfg.train_split, dataset_cfg.max_train_samples),
        ("validation", dataset_cfg.val_split, dataset_cfg.max_val_samples),
    )):
        if split is None:
            continue
        hf_split = carved[position] if carved else load_split(dataset_cfg, split)
        if role == "validation" and not carved and dataset_cfg.carve_val_fraction:
            log.info("%s: validation is the source's own %r split (%d rows), not carved from %r",
                     dataset_cfg.name, split, len(hf_split), dataset_cfg.train_split)
        if limit is not None:
            hf_split = hf_split.select(range(min(limit, len(hf_split))))
        out[role] = ConversationDataset(hf_split, dataset_cfg, split)
    return out
