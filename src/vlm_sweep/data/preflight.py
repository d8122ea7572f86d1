"""Pre-flight: check the data against the model before a single step is spent on it.

Every checked record goes through the run's own dataset (``build``: media decoded, converted)
and the run's own collator (chat template, processor, labels), one record at a time, so token
counts include the exact number of image/video placeholder tokens the processor inserts.
What it catches up front, naming the record or key:

* records that cannot be read or converted (missing/corrupt media, bad roles, empty answers);
* records longer than ``dataset.max_length`` (reported with their length);
* video records for a model family without video (``ModelFamily.supports_video``), and image and
  video records in one micro batch for a family that cannot take both (``images_with_videos``);
* generation batches a family's processor cannot take (``ModelFamily.video_conversations_per_call``).

Under ``dataset.on_bad_record=skip`` the problems training also skips (unreadable records,
over-long ones, records the collator refuses, videos for a model without video) are counted
by reason; a conversation no chat template can take and config constraints (a micro batch
the processor cannot encode) are errors under either setting. The report adds what a user wants to see
before paying for a run: a token-length histogram, the image/text token split, the padding
waste at the configured micro batch, and one record's label mask (``data/preflight_report.py``
holds the report and renders it).
"""

from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

from vlm_sweep.data.collate import IGNORE_INDEX
from vlm_sweep.data.datasets import BadRecordError
from vlm_sweep.data.media import MediaError
from vlm_sweep.data.preflight_report import PreflightReport, render_label_mask

_ROLES = ("system", "user", "assistant")
_PART_TYPES = ("text", "image", "video")
_FIX = "fix or remove the record, or set dataset.on_bad_record=skip"


def sample_indices(num_records: int, sample_size: Optional[int], seed: int) -> List[int]:
    """Which records to check: all (``None``), else the first half plus a seeded random half of the rest."""
    import numpy as np

    if sample_size is None or sample_size >= num_records:
        return list(range(num_records))
    head = (sample_size + 1) // 2
    rest = np.random.default_rng(seed).choice(np.arange(head, num_records), sample_size - head, replace=False)
    return list(range(head)) + sorted(int(i) for i in rest)


def media_token_ids(processor: Any) -> Tuple[Set[int], Set[int]]:
    """(image, video) placeholder token ids, read off the processor (no family names).

    ``image_token_ids``/``video_token_ids`` are what transformers marks as media in
    ``mm_token_type_ids`` (Gemma 3's soft tokens, not its begin-of-image marker); older or
    remote-code processors fall back to ``*_token_id`` or the ``*_token`` string.
    """
    tokenizer = getattr(processor, "tokenizer", processor)

    def ids(kind: str) -> Set[int]:
        for candidate in (getattr(processor, f"{kind}_token_ids", None),
                          [getattr(processor, f"{kind}_token_id", None)]):
            found = {int(i) for i in (candidate or []) if isinstance(i, int)}
            if found:
                return found
        token = getattr(processor, f"{kind}_token", None)
        if isinstance(token, str):
            token_id = tokenizer.convert_tokens_to_ids(token)
            if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
                return {token_id}
        return set()

    return ids("image"), ids("video")


def media_kinds(conversation: Sequence[Dict[str, Any]]) -> Set[str]:
    """The media part types ("image", "video") a conversation carries."""
    return {part.get("type") for turn in conversation if isinstance(turn.get("content"), list)
            for part in turn["content"]} & {"image", "video"}


def conversation_problem(conversation: Sequence[Dict[str, Any]]) -> Optional[str]:
    """Why a converted conversation cannot be a chat-template input, or None."""
    for i, turn in enumerate(conversation):
        if turn.get("role") not in _ROLES:
            return f"turn {i} has role {turn.get('role')!r} (expected one of {', '.join(_ROLES)})"
        content = turn.get("content")
        if not isinstance(content, list) or not content:
            return f"turn {i} has no content parts"
        kinds = [part.get("type") if isinstance(part, dict) else None for part in content]
        if any(kind not in _PART_TYPES for kind in kinds):
            return f"turn {i} has a part of unknown type (expected one of {', '.join(_PART_TYPES)})"
    if not any(turn.get("role") == "assistant" for turn in conversation):
        return "no assistant turn to train on"
    return None


def _reason(err: BadRecordError) -> str:
    """A short reason for a record the dataset refused, for counting skips."""
    text = str(err)
    if isinstance(err.__cause__, MediaError) or "cannot be decoded" in text or "cannot be read" in text \
            or "not found" in text:
        return "unreadable media"
    if "role" in text:
        return "invalid role"
    if "empty" in text or "missing" in text:
        return "missing or empty field"
    return "malformed record"


class _Checker:
    """One pass over the sampled records of every split, filling a report."""

    def __init__(self, cfg: Any, processor: Any, family: Any, collator: Any) -> None:
        self.cfg, self.family, self.processor = cfg, family, processor
        self.skip = cfg.dataset.on_bad_record == "skip"
        self.max_length = int(cfg.dataset.max_length)
        # The run's collator, with the length limit lifted so over-long records are measured,
        # raising on a bad record so its message is counted (training's copy skips it quietly).
        self.probe = copy.copy(collator)
        self.probe.max_length = 2 ** 62
        self.probe.skip_bad = False
        self.probe.packing, self.probe.pack_length = False, None  # records are checked one by one
        self.image_ids, self.video_ids = media_token_ids(processor)
        self.report = PreflightReport(
            model=str(cfg.model.name), family=str(cfg.model.family), dataset=str(cfg.dataset.name),
            max_length=self.max_length, micro_batch_size=int(cfg.step_scheduler.micro_batch_size),
            packing=f"dataset.pack_length={_yaml_value(cfg.dataset.pack_length)}" if cfg.dataset.packing else None)
        self.lengths_by_split: Dict[str, Dict[int, int]] = {}

    def problem(self, record_id: str, reason: str, message: str, skippable: bool = True) -> None:
        """Count a bad record under skip, else stop naming it and what to do."""
        line = message.splitlines()[0] if message else reason
        if not line.startswith(record_id):
            line = f"{record_id}: {line}"
        if not (skippable and self.skip):
            hint = _FIX if skippable else "fix or remove the record"
            raise BadRecordError(line if "on_bad_record" in line else f"{line} ({hint})")
        self.report.skipped[reason] = self.report.skipped.get(reason, 0) + 1
        self.report.skip_examples.setdefault(reason, line)

    def video_batching(self, record_id: str, split: str) -> None:
        """Refuse generation batch sizes the family's processor cannot take with a video in the batch.

        Training batches are encoded one record at a time (data/features.py), so only generation,
        which encodes its batch in one processor call, is bounded.
        """
        limit = self.family.video_conversations_per_call
        generates = self.cfg.eval.every_steps is not None or \
            str(self.cfg.checkpoint.best_metric or "").startswith("eval/")
        if limit is None or not generates or int(self.cfg.eval.batch_size) <= limit:  # a data set with videos
            return
        from vlm_sweep.errors import ConfigError

        raise ConfigError(
            f"config error: eval.batch_size={self.cfg.eval.batch_size}, but model family {self.report.family!r} "
            f"generates for at most {limit} conversation(s) per processor call when one has a video, and "
            f"{record_id} has a video; set eval.batch_size={limit}")

    def check(self, split: str, dataset: Any, index: int) -> None:
        record_id = dataset.record_id(index)
        try:
            sample = dataset.build(index)
        except BadRecordError as err:
            return self.problem(record_id, _reason(err), str(err))
        problem = conversation_problem(sample.conversation)
        if problem:
            return self.problem(record_id, "invalid conversation", problem, skippable=False)
        kinds = media_kinds(sample.conversation)
        if "video" in kinds:
            if "video" not in self.family.modalities:
                return self.problem(record_id, "video for a model without video", (
                    f"has a video, but model family {self.report.family!r} (model={self.report.model}) takes "
                    f"no video; use a video-capable model (family {' or '.join(self._video_families())}) or "
                    f"drop the video records"))
            self.video_batching(record_id, split)
        try:
            batch = self.probe([sample])
        except BadRecordError as err:  # e.g. the processor cannot encode it: training skips it too
            reason = "rejected by the processor" if "cannot encode" in str(err) else "refused by the collator"
            return self.problem(record_id, reason, str(err))
        except Exception as err:  # a collator that does not narrow processor errors to the record
            if str(err).startswith("config error:"):
                raise
            first = str(err).splitlines()[0] if str(err) else ""
            return self.problem(record_id, "rejected by the processor",
                                f"the processor cannot encode it ({type(err).__name__}: {first})", skippable=False)
        if "input_ids" not in batch or not len(batch["input_ids"]):
            return self.problem(record_id, "refused by the collator", "the collator dropped it")
        self.measure(split, index, record_id, kinds, batch)

    def measure(self, split: str, index: int, record_id: str, kinds: Set[str], batch: Dict[str, Any]) -> None:
        length = int(batch["attention_mask"][0].sum())
        ids = batch["input_ids"][0][:length].tolist()
        labels = batch["labels"][0][:length].tolist()
        if length > self.max_length:
            self.report.too_long.append((record_id, length))
            return self.problem(record_id, "too long", f"{length} tokens exceed dataset.max_length={self.max_length} "
                                "(raise it, or dataset.on_bad_record=skip)")
        trained = sum(label != IGNORE_INDEX for label in labels)
        if trained == 0:
            return self.problem(record_id, "no answer tokens", "no token of it is trained (the assistant "
                                "turn is missing after the chat template)")
        images = sum(i in self.image_ids for i in ids)
        videos = sum(i in self.video_ids and i not in self.image_ids for i in ids)
        report = self.report
        report.lengths.append(length)
        report.image_tokens += images
        report.video_tokens += videos
        report.text_tokens += length - images - videos
        report.trained_tokens += trained
        kind = "video" if "video" in kinds else "image" if kinds else "text only"
        report.records_by_media[kind] = report.records_by_media.get(kind, 0) + 1
        self.lengths_by_split.setdefault(split, {})[index] = length
        if report.label_preview is None:  # the first usable record (of train: it is checked first)
            tokenizer = getattr(self.processor, "tokenizer", self.processor)
            report.label_preview = (record_id, render_label_mask(tokenizer, ids, labels,
                                                                 self.image_ids | self.video_ids))

    def _video_families(self) -> List[str]:
        from vlm_sweep.models.registry import MODEL_FAMILIES

        return sorted(name for name, family in MODEL_FAMILIES.items() if "video" in family.modalities)


def padding_in_sampler_order(cfg: Any, train: Any, checked: Sequence[int],
                             lengths: Dict[int, int]) -> Optional[Tuple[int, int, int]]:
    """(real, processed, batches) for the checked train records batched as the run batches them.

    The run's sampler (same seed, same length grouping) orders the checked records; each micro
    batch drops its unusable records, as the collator does, and pads right to its longest. For
    a full check on one process this is exactly the first epoch; for a sample, the same
    batching applied to the sampled records. With ``dataset.packing`` each micro batch is
    packed into rows as the collator packs it (``data.packing.plan_rows``), padded to its longest row.
    """
    from vlm_sweep.data.packing import plan_rows, planned_positions
    from vlm_sweep.data.sampler import ShardedIndexSampler

    if not lengths:
        return None
    micro = int(cfg.step_scheduler.micro_batch_size)
    hints = None
    if cfg.dataset.group_by_length:
        every = train.length_hints()
        hints = [every[i] for i in checked]
    # As the run's loader: length groups are whole optimizer steps (one process's view of one).
    sampler = ShardedIndexSampler(len(checked), seed=int(cfg.seed), lengths=hints,
                                  batch_size=int(cfg.step_scheduler.global_batch_size))
    order = [checked[p] for p in sampler.epoch_order(0)]
    batches = [[lengths[i] for i in order[k:k + micro] if i in lengths] for k in range(0, len(order), micro)]
    batches = [b for b in batches if b]

    def processed(batch: List[int]) -> int:
        if not cfg.dataset.packing:
            return max(batch) * len(batch)
        return planned_positions(batch, plan_rows(batch, cfg.dataset.pack_length))
    return sum(map(sum, batches)), sum(processed(b) for b in batches), len(batches)


def run_preflight(cfg: Any, processor: Any, family: Any, datasets: Dict[str, Any], collator: Any,
                  sample_size: Optional[int] = 64, progress: bool = False) -> PreflightReport:
    """Check ``sample_size`` records of each split (``None``: all) against the model.

    Raises ``BadRecordError`` / ``ConfigError`` (one line naming the record or key) on the first
    problem training could not get past; under ``dataset.on_bad_record=skip`` skippable
    problems are counted in the report instead. ``progress``: a progress bar per split (for a
    full check of a large data set).
    """
    checker = _Checker(cfg, processor, family, collator)
    report = checker.report
    checked: Dict[str, List[int]] = {}
    for split, dataset in datasets.items():
        report.split_sizes[split] = len(dataset)
        checked[split] = sample_indices(len(dataset), sample_size, int(cfg.seed))
        report.checked[split] = len(checked[split])
        indices: Any = checked[split]
        if progress:
            from tqdm import tqdm

            indices = tqdm(indices, desc=f"checking {getattr(dataset, 'name', split)}", unit="record", leave=False)
        for index in indices:
            checker.check(split, dataset, index)
    if checked.get("train"):
        report.padding = padding_in_sampler_order(cfg, datasets["train"], checked["train"],
                                                  checker.lengths_by_split.get("train", {}))
    _check_usable(cfg, report, checker.lengths_by_split.get("train", {}))
    _check_media_mix(cfg, family, report)
    return report


def _check_media_mix(cfg: Any, family: Any, report: PreflightReport) -> None:
    """Image and video records in one data set, for a model that cannot take both in one forward, need
    micro batches of one record (``ModelFamily.images_with_videos``); else a mixed batch stops the run."""
    micro = int(cfg.step_scheduler.micro_batch_size)
    if family.images_with_videos or micro == 1 or not (report.records_by_media.get("image")
                                                       and report.records_by_media.get("video")):
        return
    from vlm_sweep.errors import ConfigError

    raise ConfigError(
        f"config error: step_scheduler.micro_batch_size={micro}, but {report.dataset} mixes image and video records "
        f"and model family {report.family!r} takes images and videos in one forward only apart (its video frames "
        "fill the image placeholder token); set step_scheduler.micro_batch_size=1 or train on one kind per run")


def _check_usable(cfg: Any, report: PreflightReport, train_lengths: Dict[int, int]) -> None:
    """Stop when the checked train records leave nothing, or too little, to train on."""
    checked = report.checked.get("train", 0)
    if not checked:
        return
    usable = len(train_lengths)
    minimum = getattr(cfg.dataset, "min_usable_fraction", None) or 0.0
    if usable == 0 or usable / checked < minimum:
        reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(report.skipped.items()))
        raise BadRecordError(
            f"{report.dataset}: only {usable} of {checked} checked training records are usable "
            f"(skipped: {reasons or 'none'}); e.g. {next(iter(report.skip_examples.values()), '-')}")


def _yaml_value(value: object) -> str:
    """A config value as the user writes it on the command line (None -> null)."""
    return "null" if value is None else str(value)
