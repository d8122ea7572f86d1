"""Batch conversations through the processor's chat template and label the answers.

Labels are -100 everywhere except the assistant's answer tokens and the
end-of-turn token that closes each assistant turn. The assistant header (e.g.
Gemma's ``<start_of_turn>model\\n``, Qwen's ``<|im_start|>assistant\\n``) and the
end-of-turn token are derived ONCE from the processor's own chat template, so no
family is hard-coded and no per-batch work is spent rediscovering them.

Samples may carry any number of images, videos, or none at all, mixed in one batch;
pixel budgets and video timing reach the processor through ``MediaKwargs``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch

from vlm_sweep.data.datasets import BadRecordError, Sample
from vlm_sweep.data.processor_kwargs import MediaKwargs

IGNORE_INDEX = -100
_PROBE_Q, _PROBE_A = "Probe question", "Probe answer"


@dataclass(frozen=True)
class AssistantMarkers:
    """Token ids that open an assistant turn and the one that closes it."""

    header_ids: tuple
    end_id: int

    @classmethod
    def from_processor(cls, processor: Any) -> "AssistantMarkers":
        """Render a probe conversation through the chat template and read the markers off it."""
        tokenizer = processor.tokenizer
        user = [{"role": "user", "content": [{"type": "text", "text": _PROBE_Q}]}]
        full = user + [{"role": "assistant", "content": [{"type": "text", "text": _PROBE_A}]}]
        render = processor.apply_chat_template
        prompt = render(user, tokenize=False, add_generation_prompt=False)
        with_header = render(user, tokenize=False, add_generation_prompt=True)
        complete = render(full, tokenize=False, add_generation_prompt=False)
        if not (with_header.startswith(prompt) and complete.startswith(with_header)):
            raise ValueError("chat template: the generation prompt is not a prefix of the assistant turn")
        header = with_header[len(prompt):]
        answer_at = complete.index(_PROBE_A, len(with_header))
        closing = complete[answer_at + len(_PROBE_A):]
        encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
        header_ids, closing_ids = encode(header), encode(closing)
        if not header_ids or not closing_ids:
            raise ValueError(f"chat template: empty assistant header {header!r} or end {closing!r}")
        # The turn ends at the first special token of the closing text (Nemotron closes with
        # "\n<SPECIAL_12>\n": the newline is part of the answer, <SPECIAL_12> is the stop token).
        specials = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        markers = cls(tuple(header_ids), next((i for i in closing_ids if i in specials), closing_ids[0]))
        # The header must tokenize the same inside a conversation as on its own.
        ids = encode(complete)
        if markers.find_spans(ids) == []:
            raise ValueError(f"chat template: assistant header {header!r} does not tokenize stably")
        return markers

    def find_spans(self, ids: Sequence[int]) -> List[tuple]:
        """[start, end) of every assistant answer, end-of-turn token included."""
        spans, n, h = [], len(ids), len(self.header_ids)
        i = 0
        while i <= n - h:
            if tuple(ids[i:i + h]) == self.header_ids:
                start = i + h
                end = start
                while end < n and ids[end] != self.end_id:
                    end += 1
                end = min(end + 1, n)  # include the end-of-turn token when present
                spans.append((start, end))
                i = end
            else:
                i += 1
        return spans


class VLMCollator:
    """Callable collate_fn: list of Sample (or None for skipped records) -> model batch."""

    def __init__(self, processor: Any, max_length: int, on_bad_record: str = "error", *,
                 min_pixels: Optional[int] = None, max_pixels: Optional[int] = None) -> None:
        """``min_pixels``/``max_pixels``: ``dataset.*``; a ValueError here if the processor cannot take them."""
        self.processor = processor
        self.max_length = max_length
        self.skip_bad = on_bad_record == "skip"
        self.markers = AssistantMarkers.from_processor(processor)
        self.media_kwargs = MediaKwargs(processor, min_pixels=min_pixels, max_pixels=max_pixels)

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
        for row, (ids, mask) in enumerate(zip(input_ids.tolist(), attention_mask.tolist())):
            length = sum(mask)
            for start, end in self.markers.find_spans(ids[:length]):
                labels[row, start:end] = input_ids[row, start:end]
        return labels

    def __call__(self, samples: List[Optional[Sample]]) -> Dict[str, Any]:
        kept = [s for s in samples if s is not None]
        skipped = len(samples) - len(kept)
        batch: Dict[str, Any] = {}
        while kept:
            batch = self._encode(kept)
            lengths = batch["attention_mask"].sum(dim=1).tolist()
            too_long = [i for i, n in enumerate(lengths) if n > self.max_length]
            if not too_long:
                break
            first = kept[too_long[0]]
            message = (f"{first.record_id}: {lengths[too_long[0]]} tokens exceed dataset.max_length="
                       f"{self.max_length} (raise it, or dataset.on_bad_record=skip)")
            if not self.skip_bad:
                raise BadRecordError(message)
            kept = [s for i, s in enumerate(kept) if i not in too_long]
            skipped += len(too_long)
            batch = {}
        if batch:
            batch["labels"] = self.labels_for(batch["input_ids"], batch["attention_mask"])
        batch["num_skipped"] = skipped
        batch["record_ids"] = [s.record_id for s in kept]
        return batch
