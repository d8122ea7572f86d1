"""What the data pre-flight (``data/preflight.py``) found, and how it is shown on the console."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

from vlm_sweep.data.collate import IGNORE_INDEX

# The label-mask preview is cut to this many characters.
PREVIEW_CHARS = 3000


@dataclass
class PreflightReport:
    """What the pre-flight saw; ``format_report`` renders it for the console."""

    model: str
    family: str
    dataset: str
    max_length: int
    micro_batch_size: int
    packing: Optional[str] = None  # "dataset.pack_length=<n>" when dataset.packing is on
    split_sizes: Dict[str, int] = field(default_factory=dict)  # split -> records in it
    checked: Dict[str, int] = field(default_factory=dict)  # split -> records checked
    skipped: Dict[str, int] = field(default_factory=dict)  # reason -> records
    skip_examples: Dict[str, str] = field(default_factory=dict)  # reason -> first message
    too_long: List[Tuple[str, int]] = field(default_factory=list)  # (record, tokens) > max_length
    lengths: List[int] = field(default_factory=list)  # tokens of each usable record
    records_by_media: Dict[str, int] = field(default_factory=dict)  # image / video / text only
    image_tokens: int = 0
    video_tokens: int = 0
    text_tokens: int = 0
    trained_tokens: int = 0
    # Train split in sampler order at the micro batch: (real tokens, processed tokens, batches).
    padding: Optional[Tuple[int, int, int]] = None
    label_preview: Optional[Tuple[str, str]] = None  # (record, rendered label mask)

    @property
    def usable(self) -> int:
        return len(self.lengths)

    @property
    def padding_efficiency(self) -> Optional[float]:
        """Real tokens / processed tokens when batched (1.0: no padding)."""
        if not self.padding or not self.padding[1]:
            return None
        return self.padding[0] / self.padding[1]

    def histogram(self, buckets: int = 4) -> List[Tuple[str, int]]:
        """(label, records) over equal slices of ``max_length``, plus one for over-long records."""
        edges = [round(self.max_length * (k + 1) / buckets) for k in range(buckets)]
        lengths = self.lengths + [n for _, n in self.too_long]
        rows, low = [], 0
        for high in edges:
            rows.append((f"{low + 1}-{high}", sum(low < n <= high for n in lengths)))
            low = high
        rows.append((f">{self.max_length}", sum(n > self.max_length for n in lengths)))
        return rows


def render_label_mask(tokenizer: Any, ids: Sequence[int], labels: Sequence[int], media_ids: Set[int]) -> str:
    """The decoded record with trained tokens in ``[[...]]``; runs of a media token shown as ``<tok>*N``."""
    pieces: List[List[Any]] = []  # [trained, text]
    i, n = 0, len(ids)
    while i < n:
        trained = labels[i] != IGNORE_INDEX
        j = i + 1
        if ids[i] in media_ids:
            while j < n and ids[j] == ids[i] and (labels[j] != IGNORE_INDEX) == trained:
                j += 1
            token = tokenizer.convert_ids_to_tokens(int(ids[i]))
            text = token if j - i == 1 else f"{token}*{j - i}"
        else:
            while j < n and ids[j] not in media_ids and (labels[j] != IGNORE_INDEX) == trained:
                j += 1
            text = tokenizer.decode(list(ids[i:j]))
        if pieces and pieces[-1][0] == trained:
            pieces[-1][1] += text
        else:
            pieces.append([trained, text])
        i = j
    rendered = "".join(f"[[{text}]]" if trained else text for trained, text in pieces)
    if len(rendered) > PREVIEW_CHARS:
        rendered = rendered[:PREVIEW_CHARS] + f"... ({len(rendered) - PREVIEW_CHARS} more characters)"
    return rendered


def format_report(report: PreflightReport) -> str:
    """The report as a few console lines."""
    lines = [f"data pre-flight: dataset {report.dataset} for model {report.model} (family {report.family}); "
             f"dataset.max_length={report.max_length}, micro batch {report.micro_batch_size}"]
    checked = ", ".join(f"{split} {report.checked[split]} of {report.split_sizes[split]}" for split in report.checked)
    lines.append(f"  checked    {checked} records: {report.usable} usable, {sum(report.skipped.values())} skipped")
    for reason, count in sorted(report.skipped.items(), key=lambda kv: -kv[1]):
        lines.append(f"  skipped    {reason}: {count} (e.g. {report.skip_examples[reason]})")
    if report.too_long:
        shown = ", ".join(f"{record} {tokens}" for record, tokens in report.too_long[:5])
        more = f" and {len(report.too_long) - 5} more" if len(report.too_long) > 5 else ""
        lines.append(f"  too long   {shown}{more} tokens (> {report.max_length})")
    if report.records_by_media:
        lines.append("  media      " + ", ".join(f"{kind} {n}" for kind, n in sorted(report.records_by_media.items())))
    if report.lengths:
        ordered = sorted(report.lengths)
        lines.append(f"  tokens     per usable record: min {ordered[0]}, median {ordered[len(ordered) // 2]}, "
                     f"max {ordered[-1]}")
        rows = report.histogram()
        top = max(count for _, count in rows) or 1
        width = max(len(label) for label, _ in rows)
        lines += [f"    {label:>{width}} {count:6d}  {'#' * round(30 * count / top)}".rstrip() for label, count in rows]
        total = sum(report.lengths)
        # A processor may mark video frames with the image token: then the image count holds both.
        shared = report.records_by_media.get("video") and not report.video_tokens
        split = [("image/video" if shared else "image", report.image_tokens), ("video", report.video_tokens),
                 ("text", report.text_tokens)]
        lines.append("  split      " + ", ".join(f"{name} {n} ({n / total:.1%})" for name, n in split if n or
                                                 name == "text") + f"; trained {report.trained_tokens} "
                     f"({report.trained_tokens / total:.1%})")
    if report.padding_efficiency is not None:
        real, processed, batches = report.padding
        packed = f" packed into rows ({report.packing})" if report.packing else ""
        lines.append(f"  padding    train in sampler order, {batches} batches of {report.micro_batch_size}{packed}: "
                     f"{real} real of {processed} processed tokens = {report.padding_efficiency:.1%} "
                     f"({1 - report.padding_efficiency:.1%} padding)")
    if report.label_preview:
        record, rendered = report.label_preview
        lines.append(f"  labels     {record}, trained tokens in [[...]]:")
        lines += [f"    {line}" for line in rendered.splitlines()]
    return "\n".join(lines)
