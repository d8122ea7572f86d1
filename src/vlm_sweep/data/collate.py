"""Batch conversations through the processor's chat template and label the answers.

Labels are -100 everywhere except each assistant answer and the end-of-turn token
that closes it. Where an answer starts is read ONCE per processor from its own chat
template: probe conversations with several assistant turns are rendered and the text
in front of every probe answer is an assistant header. A template may open earlier
turns differently from the last one (one renders ``Assistant\\n`` for earlier turns
but ``Assistant\\n<think>\\n`` for the final turn and the generation prompt), so the
markers hold every header seen; the longest one that matches wins. No family is
hard-coded and no per-batch work is spent rediscovering them.

Samples may carry any number of images, videos, or none at all, mixed in one batch;
pixel budgets and video timing reach the processor through ``MediaKwargs``. Records are
encoded one by one (and cached, see ``data/features.py``), so a record the processor cannot
encode, or one longer than ``max_length``, is a ``BadRecordError`` naming it (or skipped and
counted under ``skip``), and one bad record never costs its batch-mates.

With ``packing`` the micro-batch's records are packed into rows instead of padded side by side
(``data/packing.py`` says how, and how the model keeps them apart); a record longer than
``pack_length`` is a bad record like one longer than ``max_length``.
"""

from __future__ import annotations

import logging
import os
import weakref
from dataclasses import dataclass, field
from typing import Any, Dict, FrozenSet, List, Optional, Sequence, Tuple

import torch

from vlm_sweep.data.datasets import BadRecordError, Sample
from vlm_sweep.data.derived_inputs import derive_inputs, family_of_processor
from vlm_sweep.data.features import DEFAULT_FEATURE_CACHE_MB, FeatureCache, Features, merge_features, record_length
from vlm_sweep.data.packing import pack_records
from vlm_sweep.data.processor_kwargs import MediaKwargs

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
_PROBE_SYSTEM = "Probe system prompt"
_PROBE_QUESTIONS = ("Probe question one", "Probe question two", "Probe question three")
_PROBE_ANSWERS = ("Probe answer one", "Probe answer two", "Probe answer three")
# Markers computed once per processor object (a collator per split, generation, ... share them).
_CACHE: "weakref.WeakKeyDictionary[Any, AssistantMarkers]" = weakref.WeakKeyDictionary()


def _text_turn(role: str, text: str) -> Dict[str, Any]:
    return {"role": role, "content": [{"type": "text", "text": text}]}


def _probe(turns: int, system: bool) -> List[Dict[str, Any]]:
    """A conversation of ``turns`` question/answer rounds (and a system prompt first, if asked)."""
    conversation = [_text_turn("system", _PROBE_SYSTEM)] if system else []
    for question, answer in zip(_PROBE_QUESTIONS[:turns], _PROBE_ANSWERS[:turns]):
        conversation += [_text_turn("user", question), _text_turn("assistant", answer)]
    return conversation


def _common_prefix(a: str, b: str) -> int:
    return len(os.path.commonprefix([a, b]))


@dataclass(frozen=True)
class AssistantMarkers:
    """Token ids that open an assistant turn and those that close it.

    ``header_ids``/``end_id``: the generation prompt's header and the final turn's end
    token; ``headers``/``end_ids``: every header and end token the template uses.
    """

    header_ids: Tuple[int, ...]
    end_id: int
    headers: Tuple[Tuple[int, ...], ...] = ()
    end_ids: FrozenSet[int] = frozenset()
    _by_first: Dict[int, List[Tuple[int, ...]]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        headers = set(self.headers) | {self.header_ids}
        by_first: Dict[int, List[Tuple[int, ...]]] = {}
        for header in sorted(headers, key=len, reverse=True):  # longest first
            by_first.setdefault(header[0], []).append(header)
        object.__setattr__(self, "headers", tuple(sorted(headers, key=len, reverse=True)))
        object.__setattr__(self, "end_ids", frozenset(self.end_ids) | {self.end_id})
        object.__setattr__(self, "_by_first", by_first)

    @classmethod
    def for_processor(cls, processor: Any) -> "AssistantMarkers":
        """``from_processor``, cached per processor object."""
        try:
            return _CACHE[processor]
        except KeyError:
            markers = _CACHE[processor] = cls.from_processor(processor)
            return markers
        except TypeError:  # not weak-referenceable or unhashable: no cache
            return cls.from_processor(processor)

    @classmethod
    def from_processor(cls, processor: Any) -> "AssistantMarkers":
        """Render probe conversations through the chat template and read the markers off them."""
        tokenizer = processor.tokenizer
        encode = lambda text: tuple(tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
        specials = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}

        def end_of(closing: str) -> int:
            # The turn ends at the first special token of the closing text (one template closes with
            # "\n<SPECIAL_12>\n": the newline is part of the answer, <SPECIAL_12> is the stop token).
            ids = encode(closing)
            if not ids:
                raise ValueError(f"chat template: empty end of the assistant turn {closing!r}")
            return next((i for i in ids if i in specials), ids[0])

        render = lambda conv, gen=False: processor.apply_chat_template(  # noqa: E731
            conv, tokenize=False, add_generation_prompt=gen)
        user = [_text_turn("user", _PROBE_QUESTIONS[0])]
        prompt, with_header = render(user), render(user, True)
        if not with_header.startswith(prompt):
            raise ValueError("chat template: the generation prompt does not extend the conversation")
        header_ids = encode(with_header[len(prompt):])
        one_turn = render(_probe(1, system=False))
        answer_at = one_turn.find(_PROBE_ANSWERS[0], _common_prefix(one_turn, with_header))
        if not header_ids or answer_at < 0:
            raise ValueError(f"chat template: no assistant header in {with_header!r}")
        end_id = end_of(one_turn[answer_at + len(_PROBE_ANSWERS[0]):])
        headers, end_ids, probes = {header_ids}, {end_id}, []
        for turns, system in ((3, False), (2, True)):
            conversation = _probe(turns, system)
            try:
                full = render(conversation)
            except Exception:  # noqa: BLE001 - a template may refuse system turns
                if system:
                    continue
                raise
            probes.append((full, turns))
            for k in range(turns):
                before = render(conversation[: conversation.index(_text_turn("user", _PROBE_QUESTIONS[k])) + 1])
                start = _common_prefix(before, full)
                at = full.find(_PROBE_ANSWERS[k], start)
                header = encode(full[start:at]) if at >= 0 else ()
                if not header:
                    raise ValueError(f"chat template: no header in front of assistant turn {k + 1} in {full!r}")
                headers.add(header)
                stop = full.find(_PROBE_QUESTIONS[k + 1]) if k + 1 < turns else len(full)
                end_ids.add(end_of(full[at + len(_PROBE_ANSWERS[k]):stop]))
        markers = cls(header_ids, end_id, tuple(headers), frozenset(end_ids))
        for full, turns in probes:
            markers._check(full, turns, tokenizer)
        return markers

    def _check(self, rendered: str, turns: int, tokenizer: Any) -> None:
        """Every probe answer must come out as one span: headers tokenize the same in context."""
        ids = list(tokenizer.encode(rendered, add_special_tokens=False))
        spans = self.find_spans(ids)
        texts = [tokenizer.decode(ids[start:end - 1]) for start, end in spans]
        expected = list(_PROBE_ANSWERS[:turns])
        if len(texts) != turns or any(t.strip() != a for t, a in zip(texts, expected)):
            raise ValueError(f"chat template: assistant answers {expected} came out as {texts}: the "
                             f"assistant headers do not tokenize stably inside a conversation")

    def find_spans(self, ids: Sequence[int]) -> List[Tuple[int, int]]:
        """[start, end) of every assistant answer, end-of-turn token included."""
        spans: List[Tuple[int, int]] = []
        ids = list(ids)
        n, i = len(ids), 0
        while i < n:
            header = next((h for h in self._by_first.get(ids[i], ()) if tuple(ids[i:i + len(h)]) == h), None)
            if header is None:
                i += 1
                continue
            start = end = i + len(header)
            while end < n and ids[end] not in self.end_ids:
                end += 1
            end = min(end + 1, n)  # include the end-of-turn token when present
            spans.append((start, end))
            i = end
        return spans


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:300]


class VLMCollator:
    """Callable collate_fn: list of Sample (or None for skipped records) -> model batch."""

    @classmethod
    def for_dataset(cls, processor: Any, dataset_cfg: Any) -> "VLMCollator":
        """The collator a run's ``dataset`` config asks for (training, ``inspect`` and the tests build it here)."""
        return cls(processor, dataset_cfg.max_length, dataset_cfg.on_bad_record, min_pixels=dataset_cfg.min_pixels,
                   max_pixels=dataset_cfg.max_pixels, feature_cache_mb=dataset_cfg.feature_cache_mb,
                   packing=dataset_cfg.packing, pack_length=dataset_cfg.pack_length)

    def __init__(self, processor: Any, max_length: int, on_bad_record: str = "error", *,
                 min_pixels: Optional[int] = None, max_pixels: Optional[int] = None,
                 feature_cache_mb: float = DEFAULT_FEATURE_CACHE_MB, packing: bool = False,
                 pack_length: Optional[int] = None) -> None:
        """``min_pixels``/``max_pixels``/``feature_cache_mb``/``packing``/``pack_length``: ``dataset.*``;
        a ValueError here if the processor cannot take the pixel bounds."""
        self.processor = processor
        self.max_length = max_length
        self.packing = packing
        self.pack_length = pack_length if packing else None
        self.skip_bad = on_bad_record == "skip"
        self.markers = AssistantMarkers.for_processor(processor)
        # Inputs the family's forward needs that its processor does not return (registry data), if any.
        family = family_of_processor(processor)
        self.derived_family = family if family and (family.derived_inputs or family.dropped_inputs) else None
        self.images_with_videos = family is None or family.images_with_videos
        self.media_kwargs = MediaKwargs(processor, min_pixels=min_pixels, max_pixels=max_pixels)
        tokenizer = getattr(processor, "tokenizer", processor)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.cache = FeatureCache(int(feature_cache_mb * 2**20))  # one per process: each worker fills its own

    def _encode(self, samples: Sequence[Sample]) -> Dict[str, torch.Tensor]:
        conversations = [s.conversation for s in samples]
        return dict(self.processor.apply_chat_template(
            conversations,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            add_generation_prompt=False,
            processor_kwargs={"padding": True, "padding_side": "right", **self.media_kwargs(conversations)},
        ))

    def labels_for(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """-100 except the assistant answer spans (padding is never labelled)."""
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        for row, (ids, length) in enumerate(zip(input_ids.tolist(), attention_mask.sum(dim=1).tolist())):
            for start, end in self.markers.find_spans(ids[:length]):
                labels[row, start:end] = input_ids[row, start:end]
        return labels

    def _features(self, sample: Sample) -> Optional[Features]:
        """One record's model inputs (cached); None if it is bad and bad records are skipped."""
        cached = self.cache.get(sample.record_id)
        if cached is not None:
            return cached
        try:
            features = self._encode([sample])
            if self.derived_family is not None:
                features = derive_inputs(features, self.processor, self.derived_family)
        except Exception as err:  # noqa: BLE001 - any processor failure names the record
            return self._bad(f"{sample.record_id}: the processor cannot encode it ({_first_line(err)})")
        if not self.images_with_videos and "pixel_values" in features and "pixel_values_videos" in features:
            return self._bad(f"{sample.record_id}: has images and a video, which this model cannot take in one "
                             "forward (its frames fill the image placeholder token); split the record, or "
                             "dataset.on_bad_record=skip")
        length = record_length(features)
        if length > self.max_length:
            return self._bad(f"{sample.record_id}: {length} tokens exceed dataset.max_length="
                             f"{self.max_length} (raise it, or dataset.on_bad_record=skip)")
        if self.pack_length is not None and length > self.pack_length:
            return self._bad(f"{sample.record_id}: {length} tokens exceed dataset.pack_length="
                             f"{self.pack_length} (raise it, or dataset.on_bad_record=skip)")
        self.cache.put(sample.record_id, features)
        return features

    def _refuse_images_with_videos(self, kept: List[Tuple[Sample, Features]]) -> None:
        """A model whose images and video frames share one placeholder token cannot take both in one forward."""
        images = [s.record_id for s, f in kept if "pixel_values" in f]
        videos = [s.record_id for s, f in kept if "pixel_values_videos" in f]
        if images and videos:
            raise BadRecordError(
                f"{images[0]} (images) and {videos[0]} (video) are in one micro-batch, but this model takes images "
                "and videos in one forward only apart (its frames fill the image placeholder token); set "
                "step_scheduler.micro_batch_size=1 or train on one kind per run")

    def _bad(self, message: str) -> None:
        if not self.skip_bad:
            raise BadRecordError(message) from None
        log.warning("skipping bad record: %s", message)
        return None

    def __call__(self, samples: List[Optional[Sample]]) -> Dict[str, Any]:
        encoded = [(s, self._features(s)) for s in samples if s is not None]
        kept = [(s, f) for s, f in encoded if f is not None]
        if not self.images_with_videos:
            self._refuse_images_with_videos(kept)
        if self.packing and kept:
            return self._packed(kept, len(samples) - len(kept))
        batch: Dict[str, Any] = merge_features([f for _, f in kept], self.pad_token_id)
        if batch:
            batch["labels"] = self.labels_for(batch["input_ids"], batch["attention_mask"])
        batch["num_skipped"] = len(samples) - len(kept)
        batch["record_ids"] = [s.record_id for s, _ in kept]
        return batch

    def _packed(self, kept: List[Tuple[Sample, Features]], skipped: int) -> Dict[str, Any]:
        """Rows of whole conversations; each record labelled on its own, as unpacked."""
        features = [f for _, f in kept]
        labels = []
        for f in features:
            row = self.labels_for(f["input_ids"], torch.ones_like(f["input_ids"]))[0]
            row[0] = IGNORE_INDEX  # the previous conversation's last token never predicts this one's first
            labels.append(row)
        batch = pack_records(features, labels, self.pack_length, self.pad_token_id)
        batch["num_skipped"] = skipped
        batch["record_ids"] = [kept[i][0].record_id for i in batch["pack_order"]]
        return batch
