"""A few scored records shown to a person: the image saved as PNG, the ground truth and the model's answer.

A metric table says *how much* a model learned; a receipt next to what the model read from it
says *what*. ``show_examples`` takes one model's evaluation rows (``record_id``, ``prediction``,
``reference``) and the evaluated samples (for their images), saves the first ``num`` records'
images as PNG under ``out_dir`` and returns printable text: per record the image path, how many
fields are right, the ground truth and the answer one above the other (as JSON where they are
Donut tag sequences, e.g. CORD-v2), then where all predictions are. The first records in data set
order are shown, not the best ones.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
_DIGITS = re.compile(r"(\d+)")


@dataclass
class Example:
    """One shown record: where its image went and both texts (JSON-decoded where they are tag sequences)."""

    record_id: str
    image_path: Optional[Path]
    reference: Any
    prediction: Any


def as_json(text: str) -> Any:
    """A Donut tag sequence (``<s_total>...``) as its JSON object; any other answer stays text."""
    if "<s_" not in text:
        return text
    from vlm_sweep.donut import token2json

    return token2json(text)


def first_image(sample: Any) -> Any:
    """The first image of a sample's conversation (a PIL image), or None for a text/video-only record."""
    for message in sample.conversation or []:
        for part in message.get("content", []):
            if isinstance(part, dict) and part.get("type") == "image":
                return part.get("image")
    return None


def record_order(record_id: str) -> tuple:
    """Sort key in the data set's order: ``test[2]`` before ``test[10]`` (rows come sorted as text)."""
    return tuple(int(part) if part.isdigit() else part for part in _DIGITS.split(record_id))


def image_filename(record_id: str) -> str:
    """``synthetic_receipts/test[3]`` -> ``synthetic_receipts_test_3.png`` (safe on every file system)."""
    return _UNSAFE.sub("_", record_id).strip("_") + ".png"


def _save_image(image: Any, path: Path) -> Optional[Path]:
    if image is None or not hasattr(image, "save"):
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    image.convert("RGB").save(tmp, format="PNG")
    tmp.replace(path)  # a reader never sees half a PNG
    return path


def _fields(data: Any) -> List[tuple]:
    from vlm_sweep.metrics.cord import flatten, normalize_dict

    return flatten(normalize_dict(data)) if isinstance(data, dict) else [("", data)]


def matched_fields(prediction: Any, reference: Any) -> tuple[int, int]:
    """(fields of the reference the prediction got exactly right, fields in the reference), as field F1 counts them."""
    expected, right = _fields(reference), 0
    for field in _fields(prediction):
        if field in expected:
            expected.remove(field)
            right += 1
    return right, right + len(expected)


def verdict(prediction: Any, reference: Any) -> str:
    """``3 of 5 fields right`` for structured answers (receipts); ``right``/``wrong`` for a plain answer,
    compared case- and space-insensitively with it or with any of the accepted answers (a list)."""
    if isinstance(reference, dict):
        right, expected = matched_fields(prediction, reference)
        return f"{right} of {expected} fields right"
    from vlm_sweep.metrics.vqa import anls_one

    accepted = [str(a) for a in (reference if isinstance(reference, list) else [reference])]
    return "right" if anls_one(str(prediction), accepted) == 1.0 else "wrong"


SHOWN_CHARS = 300  # an untrained model can ramble for max_new_tokens: the file has the whole answer


def _compact(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, sort_keys=True)
    return text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS]}... ({len(text):,} characters)"


def _records(value: Any) -> Optional[List[Any]]:
    """A list of records as is, one record (CORD's single menu item) as a list of one; None for anything else."""
    if isinstance(value, dict):
        return [value]
    if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
        return value
    return None


def _paired_lines(reference: Any, prediction: Any) -> List[str]:
    """Truth and answer one above the other, per top-level field of the truth (then fields only the answer has);
    a field holding several records (CORD's menu) gets one pair of lines per record: ``menu[0]``, ``menu[1]``."""
    if not isinstance(reference, dict) or not isinstance(prediction, dict):
        return [f"    truth  {_compact(reference)}", f"    model  {_compact(prediction)}"]
    missing = object()
    rows = []
    for key in sorted(reference) + sorted(k for k in prediction if k not in reference):
        truth, answer = reference.get(key, missing), prediction.get(key, missing)
        listed = [v for v in (truth, answer) if v is not missing]
        if any(isinstance(v, list) for v in listed) and all(_records(v) is not None for v in listed):
            truths = _records(truth) if truth is not missing else []
            answers = _records(answer) if answer is not missing else []
            rows += [(f"{key}[{i}]", truths[i] if i < len(truths) else missing,
                      answers[i] if i < len(answers) else missing) for i in range(max(len(truths), len(answers)))]
        else:
            rows.append((key, truth, answer))
    width = max((len(label) for label, _, _ in rows), default=0)
    lines = []
    for label, truth, answer in rows:
        lines += [f"    {label:<{width}}  truth  {'-' if truth is missing else _compact(truth)}",
                  f"    {'':<{width}}  model  {'-' if answer is missing else _compact(answer)}"]
    return lines


def write_examples(rows: Sequence[Mapping[str, Any]], samples: Sequence[Any], out_dir: str | Path,
                   num: int = 3) -> List[Example]:
    """Save the images of the first ``num`` records (in data set order) to ``out_dir``; return them as Examples.

    ``rows``: one model's evaluation rows (``record_id``, ``prediction``, ``reference``);
    ``samples``: the evaluated samples (``.record_id``, ``.conversation``), for their images.
    """
    images = {s.record_id: s for s in samples}
    examples = []
    for row in sorted(rows, key=lambda r: record_order(r["record_id"]))[:max(0, num)]:
        sample = images.get(row["record_id"])
        path = _save_image(first_image(sample) if sample is not None else None,
                           Path(out_dir) / image_filename(row["record_id"]))
        examples.append(Example(row["record_id"], path, as_json(row["reference"]), as_json(row["prediction"])))
    return examples


def format_examples(examples: Sequence[Example], predictions_path: Optional[str | Path] = None,
                    total: Optional[int] = None) -> str:
    """Printable text: per example its image path, how many fields are right, ground truth and answer."""
    count = f"{len(examples)} of {total}" if total is not None else str(len(examples))
    lines = [f"Example predictions ({count} records):"]
    for example in examples:
        lines += ["", f"{example.record_id}: {verdict(example.prediction, example.reference)}",
                  f"    image: {example.image_path if example.image_path else '(no image)'}",
                  *_paired_lines(example.reference, example.prediction)]
    if predictions_path is not None:
        lines += ["", f"All predictions: {predictions_path}"]
    return "\n".join(lines)


def show_examples(rows: Sequence[Mapping[str, Any]], samples: Sequence[Any], out_dir: str | Path, num: int = 3,
                  predictions_path: Optional[str | Path] = None) -> str:
    """``write_examples`` then ``format_examples``: what the evaluate command prints after its metric table."""
    examples = write_examples(rows, samples, out_dir, num)
    return format_examples(examples, predictions_path, total=len(rows))


def rows_of(predictions_path: str | Path, model: str = "fine-tuned") -> List[Dict[str, Any]]:
    """One model's rows from an evaluation's ``predictions.jsonl`` (as ``score_checkpoint`` writes it)."""
    with open(predictions_path) as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return [r for r in rows if r.get("model", model) == model]
