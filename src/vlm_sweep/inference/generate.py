"""Batched generation from conversations: shared by the generate CLI, scoring and the training loop.

Also turns the generate command's inputs (one prompt with images/video, or rows of a JSONL
file) into conversations, and refuses video for a family that takes none, in one line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from vlm_sweep.errors import UserError

Conversation = List[Dict[str, Any]]
DEFAULT_PROMPT = "Describe this image."


class GenerationInputError(UserError, ValueError):
    """An input row that cannot be read, or asks for media the model's family cannot take."""


@dataclass
class SamplingConfig:
    """How to decode; the defaults are the CLIs' defaults too (``vlm_sweep.cli.args``)."""

    max_new_tokens: int = 256  # long enough for a CORD receipt's tag sequence
    do_sample: bool = False    # greedy by default: reproducible evaluation
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50


def user_turn(prompt: str, images: Sequence[Any] = (), video: Optional[Any] = None) -> Conversation:
    """A one-turn conversation: images (in order), then a video, then the prompt."""
    content: List[Dict[str, Any]] = [{"type": "image", "image": image} for image in images]
    if video is not None:
        content.append({"type": "video", "video": video})
    content.append({"type": "text", "text": prompt})
    return [{"role": "user", "content": content}]


def prompt_part(conversation: Conversation) -> Conversation:
    """The conversation up to (not including) the last assistant turn."""
    last = max((i for i, t in enumerate(conversation) if t["role"] == "assistant"), default=None)
    return conversation if last is None else conversation[:last]


def generate(model: Any, processor: Any, conversations: Sequence[Conversation],
             sampling: Optional[SamplingConfig] = None, media_kwargs: Optional[Any] = None) -> List[str]:
    """Answers for a batch of prompt conversations (left-padded, generation prompt added).

    ``media_kwargs``: the training collator's MediaKwargs (pixel budget), so images are
    sized as in training; by default the processor's own sizing and the videos' timing.
    """
    import torch

    from vlm_sweep.data.processor_kwargs import MediaKwargs

    sampling = sampling or SamplingConfig()
    media_kwargs = media_kwargs or MediaKwargs(processor)
    inputs = processor.apply_chat_template(
        list(conversations), tokenize=True, return_dict=True, return_tensors="pt",
        add_generation_prompt=True,
        processor_kwargs={"padding": True, "padding_side": "left", **media_kwargs(conversations)})
    device = next(model.parameters()).device
    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
    kwargs: Dict[str, Any] = {"max_new_tokens": sampling.max_new_tokens, "do_sample": sampling.do_sample}
    if sampling.do_sample:
        kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
    tokenizer = processor.tokenizer
    if tokenizer.pad_token_id is not None:
        kwargs["pad_token_id"] = tokenizer.pad_token_id
    with torch.no_grad():
        output = model.generate(**inputs, **kwargs)
    new_tokens = output[:, inputs["input_ids"].shape[1]:]
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def read_rows(input_jsonl: str) -> List[Dict[str, Any]]:
    """The rows of a batch input file; a missing file or a line that is not JSON is one line naming it."""
    path = Path(input_jsonl)
    try:
        lines = path.read_text().splitlines()
    except OSError as err:
        raise GenerationInputError(f"cannot read {path}: {err.strerror or err}") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise GenerationInputError(f"{path} line {number} is not JSON: {err.msg}") from None
        if not isinstance(row, dict):
            raise GenerationInputError(f"{path} line {number} is not a JSON object")
        rows.append(row)
    return rows


def row_conversation(row: Dict[str, Any], base: Path, num_frames: int) -> Conversation:
    """The conversation of one input row ``{image: path | [paths], video: path, prompt: text}``.

    Relative media paths are taken relative to ``base`` (the input file's folder).
    """
    from vlm_sweep.data.media import load_video_frames, open_image

    images = row.get("image") or []
    images = [images] if isinstance(images, str) else images
    resolve = lambda p: p if Path(p).is_absolute() else base / p  # noqa: E731
    video = load_video_frames(resolve(row["video"]), num_frames) if row.get("video") else None
    return user_turn(row.get("prompt", DEFAULT_PROMPT), [open_image(resolve(i)) for i in images], video)


def check_video_support(family_name: str, rows: List[Dict[str, Any]], input_jsonl: Optional[str]) -> None:
    """Refuse, in one line, a row that asks for video when the model's family takes none."""
    from vlm_sweep.models.registry import MODEL_FAMILIES, get_family

    with_video = [i for i, row in enumerate(rows) if row.get("video")]
    if not with_video or get_family(family_name).supports_video:
        return
    where = f"{input_jsonl} row {with_video[0] + 1} has a video" if input_jsonl else "--video"
    capable = ", ".join(sorted(n for n, f in MODEL_FAMILIES.items() if f.supports_video))
    raise GenerationInputError(f"{where}, but this checkpoint is a {family_name} model, which takes no video "
                               f"input; use a checkpoint of a video-capable family ({capable})")


def generate_for_loaded(loaded: Any, conversations: Sequence[Conversation], sampling: SamplingConfig,
                        batch_size: int) -> List[str]:
    """Answers for ``conversations`` in batches, with images sized by the pixel budget the model trained with."""
    from vlm_sweep.data.processor_kwargs import MediaKwargs

    budget = (loaded.run_config or {}).get("dataset", {})
    media = MediaKwargs(loaded.processor, budget.get("min_pixels"), budget.get("max_pixels"))
    answers: List[str] = []
    for i in range(0, len(conversations), batch_size):
        answers += generate(loaded.model, loaded.processor, conversations[i:i + batch_size], sampling,
                            media_kwargs=media)
    return answers


def format_answer(text: str, output_format: str) -> Any:
    """``text`` as is, or (``json``) a CORD-style tag sequence parsed with token2json."""
    if output_format == "json":
        from vlm_sweep.donut import token2json

        return token2json(text)
    return text
