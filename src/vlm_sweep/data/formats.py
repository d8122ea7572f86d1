"""The conversation form every data set converts to, and the helpers converters share.

A conversation is the chat-template form every processor takes:
``[{"role": "user", "content": [{"type": "image", "image": PIL}, {"type": "text", ...}]},
{"role": "assistant", "content": [{"type": "text", "text": answer}]}]``; a video part is
``{"type": "video", "video": VideoFrames}`` (a list of PIL frames with its sampling metadata).
Each data set's own converter lives in ``vlm_sweep.data.sets.<name>``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

Conversation = List[Dict[str, Any]]


def text_value(value: Any, what: str) -> str:
    """A non-empty, stripped string, or a ValueError naming the field."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{what} is missing or empty")
    return value.strip()


def turn(role: str, *parts: Dict[str, Any]) -> Dict[str, Any]:
    """One chat turn holding ``parts`` in order."""
    return {"role": role, "content": list(parts)}


def text_part(text: str) -> Dict[str, Any]:
    """A text content part."""
    return {"type": "text", "text": text}


def resolve_media(path: str, root: Optional[str | Path], key: str, field: str = "media path") -> Path:
    """A record's media path: absolute as is, relative against ``root`` (named by ``key``); ``field`` names
    where the record keeps it, for the error."""
    if not isinstance(path, str) or not path:
        raise ValueError(f"{field} is missing (expected a file path, got {path!r})")
    candidate = Path(path)
    if candidate.is_absolute():
        return candidate
    if root is None:
        raise ValueError(f"relative path {path!r} needs {key} to be set")
    return Path(root) / candidate


def load_video(path: Path, dataset_cfg: Any) -> Any:
    """A video's frames, sampled as ``dataset.num_frames`` / ``dataset.fps`` say."""
    from vlm_sweep.data.media import load_video_frames

    return load_video_frames(path, num_frames=dataset_cfg.num_frames, fps=dataset_cfg.fps)


def assistant_texts(conversation: Conversation) -> List[str]:
    """The assistant turns' text, in order (what the labels must equal)."""
    return [
        "".join(part["text"] for part in message["content"] if part.get("type") == "text")
        for message in conversation
        if message["role"] == "assistant"
    ]
