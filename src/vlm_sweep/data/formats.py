"""Record formats: how one record of a source data set becomes a conversation.

A conversation is the chat-template form every processor takes:
``[{"role": "user", "content": [{"type": "image", "image": PIL}, {"type": "text", ...}]},
{"role": "assistant", "content": [{"type": "text", "text": answer}]}]``; a video part is
``{"type": "video", "video": VideoFrames}`` (a list of PIL frames with its sampling metadata).
Adding a data set schema means adding one function here (and, if the source holds rows that
are unusable by design, a row filter in ``ROW_FILTERS``).

Converters raise ``ValueError``/``KeyError``/``TypeError`` on a bad record; the dataset
turns those into ``BadRecordError`` naming the record.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

Conversation = List[Dict[str, Any]]


def _text(value: Any, what: str) -> str:
    """A non-empty, stripped string, or a ValueError naming the field."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{what} is missing or empty")
    return value.strip()


def _turn(role: str, *parts: Dict[str, Any]) -> Dict[str, Any]:
    return {"role": role, "content": list(parts)}


def _text_part(text: str) -> Dict[str, Any]:
    return {"type": "text", "text": text}


# ---------------------------------------------------------------- image data sets


def cord_v2(record: Dict[str, Any], dataset_cfg: Any) -> Conversation:
    """naver-clova-ix/cord-v2: image + ground_truth JSON -> Donut token string."""
    from vlm_sweep.data.cord import cord_record_to_conversation

    return cord_record_to_conversation(record, prompt=dataset_cfg.prompt)


def medpix_vqa(record: Dict[str, Any], dataset_cfg: Any) -> Conversation:
    """mmoukouba/MedPix-VQA: ``image_id`` (an Image despite its name) + question -> answer."""
    image = record.get("image_id")
    if image is None:
        raise ValueError("image_id (the image) is missing")
    return [
        _turn("user", {"type": "image", "image": image}, _text_part(_text(record.get("question"), "question"))),
        _turn("assistant", _text_part(_text(record.get("answer"), "answer"))),
    ]


def raven(record: Dict[str, Any], dataset_cfg: Any) -> Conversation:
    """HuggingFaceM4/the_cauldron, subset raven: every image in order, then texts[0].user -> .assistant."""
    images = record.get("images") or []
    if not images or any(image is None for image in images):
        raise ValueError("images are missing")
    texts = record.get("texts") or []
    first = texts[0] if texts and isinstance(texts[0], dict) else {}
    question = _text(first.get("user"), "texts[0].user")
    answer = _text(first.get("assistant"), "texts[0].assistant")
    parts = [{"type": "image", "image": image} for image in images]
    return [_turn("user", *parts, _text_part(question)), _turn("assistant", _text_part(answer))]


# ---------------------------------------------------------------- video data sets

_PLACEHOLDER = re.compile(r"<(?:image|video)>\n?")
_SPEAKERS = {"human": "user", "gpt": "assistant", "system": "system"}


def strip_placeholders(text: str) -> str:
    """Drop LLaVA's ``<image>``/``<video>`` markers: the processor places the media itself."""
    return re.sub(r"[ \t]{2,}", " ", _PLACEHOLDER.sub("", text)).strip()


def resolve_media(path: str, root: Optional[str | Path], key: str) -> Path:
    """A record's media path: absolute as is, relative against ``root`` (named by ``key``)."""
    if not isinstance(path, str) or not path:
        raise ValueError("media path is missing")
    candidate = Path(path)
    if candidate.is_absolute():
        return candidate
    if root is None:
        raise ValueError(f"relative path {path!r} needs {key} to be set")
    return Path(root) / candidate


def _load_video(path: Path, dataset_cfg: Any) -> Any:
    from vlm_sweep.data.media import load_video_frames

    return load_video_frames(path, num_frames=dataset_cfg.num_frames, fps=dataset_cfg.fps)


def llava_video_178k(record: Dict[str, Any], dataset_cfg: Any) -> Conversation:
    """lmms-lab/LLaVA-Video-178K: human/gpt turns; the first human turn carries the video.

    ``video`` is relative to ``dataset.video_root_path`` (where the subset's tarballs
    were extracted); ``<image>``/``<video>`` markers are stripped from the text.
    """
    turns = record.get("conversations") or []
    if not turns:
        raise ValueError("conversations are missing")
    conversation: Conversation = []
    for i, turn in enumerate(turns):
        role = _SPEAKERS.get((turn or {}).get("from"))
        if role is None:
            raise ValueError(f"conversations[{i}] has unknown speaker {(turn or {}).get('from')!r}")
        text = _text(strip_placeholders(turn.get("value") or ""), f"conversations[{i}].value")
        conversation.append(_turn(role, _text_part(text)))
    first_user = next((turn for turn in conversation if turn["role"] == "user"), None)
    if first_user is None:
        raise ValueError("no human turn to carry the video")
    path = resolve_media(record.get("video"), dataset_cfg.video_root_path, "dataset.video_root_path")
    first_user["content"].insert(0, {"type": "video", "video": _load_video(path, dataset_cfg)})
    return conversation


# ---------------------------------------------------------------- your own data


def data_dir(path: str | Path) -> Path:
    """Where a custom data set's relative media paths start: the data file's directory."""
    path = Path(path)
    return path.parent if path.is_file() else path


def _custom_part(part: Dict[str, Any], base: Path, dataset_cfg: Any, where: str) -> Dict[str, Any]:
    kind = (part or {}).get("type")
    if kind == "text":
        return _text_part(_text(part.get("text"), f"{where}.text"))
    if kind == "image":
        from vlm_sweep.data.media import open_image

        return {"type": "image", "image": open_image(resolve_media(part.get("image"), base, "dataset.path"))}
    if kind == "video":
        return {"type": "video", "video": _load_video(resolve_media(part.get("video"), base, "dataset.path"),
                                                      dataset_cfg)}
    raise ValueError(f"{where} has unknown type {kind!r} (image, video or text)")


def custom(record: Dict[str, Any], dataset_cfg: Any) -> Conversation:
    """Your own JSON/JSONL/parquet rows: ``messages`` of ``{role, content: [{type, ...}]}``.

    Roles are system/user/assistant; parts are ``{type: text, text}``, ``{type: image, image: path}``
    or ``{type: video, video: path}``, paths relative to the data file's directory.
    """
    messages = record.get("messages") or []
    if not messages:
        raise ValueError("messages are missing")
    base = data_dir(dataset_cfg.path)
    conversation: Conversation = []
    for i, message in enumerate(messages):
        role = (message or {}).get("role")
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"messages[{i}] has unknown role {role!r}")
        content = message.get("content")
        if isinstance(content, str):
            parts = [_text_part(_text(content, f"messages[{i}].content"))]
        else:
            parts = [_custom_part(part, base, dataset_cfg, f"messages[{i}].content[{j}]")
                     for j, part in enumerate(content or [])]
        if not parts:
            raise ValueError(f"messages[{i}] has no content")
        conversation.append({"role": role, "content": parts})
    if not any(turn["role"] == "assistant" for turn in conversation):
        raise ValueError("no assistant turn")
    return conversation


RECORD_FORMATS: Dict[str, Callable[[Dict[str, Any], Any], Conversation]] = {
    "cord_v2": cord_v2,
    "medpix_vqa": medpix_vqa,
    "raven": raven,
    "llava_video_178k": llava_video_178k,
    "custom": custom,
}


# ---------------------------------------------------------------- load-time row filters


@dataclass(frozen=True)
class RowFilter:
    """Rows a source holds that are unusable by design: dropped (and counted) at load time.

    ``keep`` sees an Arrow table of ``columns`` with media still encoded, so filtering
    decodes no image.
    """

    columns: Sequence[str]
    keep: Callable[[Any], List[bool]]
    reason: str


def _raven_complete(batch: Any) -> List[bool]:
    """Rows with at least one image, every image present, and texts[0].user/.assistant non-empty."""
    import pyarrow.compute as pc

    images = batch.column("images").combine_chunks()
    counts = pc.fill_null(pc.list_value_length(images), 0).to_pylist()
    items = pc.list_flatten(images)
    present = pc.fill_null(pc.or_(pc.is_valid(pc.struct_field(items, "bytes")),
                                  pc.is_valid(pc.struct_field(items, "path"))), False)
    parents = pc.list_parent_indices(images)
    broken = set(pc.filter(parents, pc.invert(present)).to_pylist())
    keep = []
    for row, (count, texts) in enumerate(zip(counts, batch.column("texts").to_pylist())):
        first = (texts or [None])[0] or {}
        has_text = all(isinstance(first.get(k), str) and first[k].strip() for k in ("user", "assistant"))
        keep.append(count > 0 and row not in broken and has_text)
    return keep


ROW_FILTERS: Dict[str, RowFilter] = {
    "raven": RowFilter(("images", "texts"), _raven_complete, "without images or texts[0] user/assistant text"),
}


def assistant_texts(conversation: Conversation) -> List[str]:
    """The assistant turns' text, in order (what the labels must equal)."""
    return [
        "".join(part["text"] for part in turn["content"] if part.get("type") == "text")
        for turn in conversation
        if turn["role"] == "assistant"
    ]
