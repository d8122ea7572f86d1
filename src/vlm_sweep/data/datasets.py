"""Load a split with HF datasets and turn records into conversations lazily.

Records are decoded on access (images stay encoded in the Arrow table), so a
large data set never sits decoded in memory. A bad record (corrupt image,
undecodable JSON, empty answer) raises ``BadRecordError`` naming it, or, with
``dataset.on_bad_record=skip``, yields ``None`` that the collator drops and counts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from vlm_sweep.hub import hub_offline, hub_reachable
from vlm_sweep.data.formats import RECORD_FORMATS, Conversation, assistant_texts

log = logging.getLogger(__name__)


class BadRecordError(ValueError):
    """A record that cannot be trained on; the message names it."""


class DatasetLoadError(RuntimeError):
    """A data set could not be loaded; the message says what to do."""


@dataclass
class Sample:
    """One training example: where it came from and its conversation."""

    record_id: str
    conversation: Conversation


def ensure_local_data(dataset_cfg: Any) -> None:
    """Generate a synthetic data set into ``dataset.path`` once, if configured."""
    if not dataset_cfg.synthetic:
        return
    from vlm_sweep.data.synthetic_receipts import generate_synthetic_receipts

    generate_synthetic_receipts(dataset_cfg.path, **dict(dataset_cfg.synthetic))


def load_split(dataset_cfg: Any, split: str) -> Any:
    """One split as a ``datasets.Dataset`` (hub id or local dir in the same schema)."""
    ensure_local_data(dataset_cfg)
    source = str(dataset_cfg.path)
    if not Path(source).exists():
        if not hub_offline() and not hub_reachable():
            raise DatasetLoadError(
                f"dataset {source!r} is not a local path and the Hugging Face hub is not reachable; "
                f"download it where there is network and set HF_HOME / HF_HUB_OFFLINE=1, or set "
                f"dataset.path to a local copy in the same schema."
            )
    import datasets

    try:
        return datasets.load_dataset(source, name=dataset_cfg.subset, split=split)
    except (FileNotFoundError, ValueError, ConnectionError) as err:
        raise DatasetLoadError(
            f"could not load split {split!r} of dataset {source!r}: {str(err).splitlines()[0]}"
        ) from err


def _as_rgb(image: Any, where: str) -> Any:
    try:
        return image.convert("RGB")  # forces the full decode: truncated files fail here
    except Exception as err:
        raise BadRecordError(f"{where}: image cannot be decoded ({err})") from err


class ConversationDataset:
    """Map-style dataset of ``Sample`` built on demand from a HF split."""

    def __init__(self, hf_split: Any, dataset_cfg: Any, split: str) -> None:
        self.hf_split = hf_split
        self.to_conversation = RECORD_FORMATS[dataset_cfg.format]
        self.cfg = dataset_cfg
        self.name = f"{dataset_cfg.name}/{split}"
        self.skip_bad = dataset_cfg.on_bad_record == "skip"

    def __len__(self) -> int:
        return len(self.hf_split)

    def record_id(self, index: int) -> str:
        return f"{self.name}[{index}]"

    def build(self, index: int) -> Sample:
        """The sample at ``index``; raises BadRecordError naming the record."""
        where = self.record_id(index)
        try:
            record = self.hf_split[index]
        except Exception as err:  # image decode errors surface on access
            raise BadRecordError(f"{where}: cannot be read ({err})") from err
        try:
            conversation = self.to_conversation(record, self.cfg)
        except BadRecordError:
            raise
        except (ValueError, KeyError, TypeError) as err:
            raise BadRecordError(f"{where}: {err}") from err
        for turn in conversation:
            for part in turn["content"]:
                if part.get("type") == "image":
                    part["image"] = _as_rgb(part["image"], where)
        if not any(text.strip() for text in assistant_texts(conversation)):
            raise BadRecordError(f"{where}: empty answer")
        return Sample(record_id=where, conversation=conversation)

    def __getitem__(self, index: int) -> Optional[Sample]:
        try:
            return self.build(index)
        except BadRecordError as err:
            if not self.skip_bad:
                raise
            log.warning("skipping bad record: %s", err)
            return None

    def length_hints(self) -> List[int]:
        """Cheap per-record size estimates (text characters) for length grouping.

        Reads only the non-image columns, so no image is decoded.
        """
        from datasets import Image, Sequence

        text_columns = [
            name for name, feature in self.hf_split.features.items()
            if not isinstance(feature, (Image, Sequence, list))
        ]
        table = self.hf_split.select_columns(text_columns)
        return [sum(len(str(v)) for v in row.values()) for row in table]


def build_datasets(dataset_cfg: Any) -> Dict[str, ConversationDataset]:
    """Train and (if configured) validation datasets, truncated to max_*_samples."""
    out: Dict[str, ConversationDataset] = {}
    for role, split, limit in (
        ("train", dataset_cfg.train_split, dataset_cfg.max_train_samples),
        ("validation", dataset_cfg.val_split, dataset_cfg.max_val_samples),
    ):
        if split is None:
            continue
        hf_split = load_split(dataset_cfg, split)
        if limit is not None:
            hf_split = hf_split.select(range(min(limit, len(hf_split))))
        out[role] = ConversationDataset(hf_split, dataset_cfg, split)
    return out
