"""Your own data: JSON / JSONL / parquet rows of ``messages``, media paths relative to the file.

Roles are system/user/assistant; parts are ``{type: text, text}``, ``{type: image, image: path}``
or ``{type: video, video: path}``. Every assistant turn is trained on; answers are free text,
so the metric is normalised exact match and token F1.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Dict

from vlm_sweep.data.fixture_parts import phrase, png, write_video
from vlm_sweep.data.formats import Conversation, load_video, resolve_media, text_part, text_value
from vlm_sweep.data.sets import DatasetSpec
from vlm_sweep.metrics.vqa import free_text_scores


def data_dir(path: str | Path) -> Path:
    """Where relative media paths start: the data file's directory."""
    path = Path(path)
    return path.parent if path.is_file() else path


def _part(part: Dict[str, Any], base: Path, dataset_cfg: Any, where: str) -> Dict[str, Any]:
    kind = (part or {}).get("type")
    if kind == "text":
        return text_part(text_value(part.get("text"), f"{where}.text"))
    if kind == "image":
        from vlm_sweep.data.media import open_image

        path = resolve_media(part.get("image"), base, "dataset.path", f"{where}.image")
        return {"type": "image", "image": open_image(path)}
    if kind == "video":
        path = resolve_media(part.get("video"), base, "dataset.path", f"{where}.video")
        return {"type": "video", "video": load_video(path, dataset_cfg)}
    raise ValueError(f"{where} has unknown type {kind!r} (image, video or text)")


def to_conversation(record: Dict[str, Any], dataset_cfg: Any) -> Conversation:
    """The record's ``messages``, media opened; at least one assistant turn."""
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
            parts = [text_part(text_value(content, f"messages[{i}].content"))]
        else:
            parts = [_part(part, base, dataset_cfg, f"messages[{i}].content[{j}]")
                     for j, part in enumerate(content or [])]
        if not parts:
            raise ValueError(f"messages[{i}] has no content")
        conversation.append({"role": role, "content": parts})
    if not any(message["role"] == "assistant" for message in conversation):
        raise ValueError("no assistant turn")
    return conversation


def write_fixture(root: str | Path, num_rows: int = 12, with_video: bool = True, seed: int = 0) -> Path:
    """``<root>/train.jsonl``; media under ``images/``, ``videos/``. Returns the data file's path.

    Rows cycle through: one image; two images; a video (if ``with_video``); a system turn
    and two question/answer rounds; text only.
    """
    root, rng = Path(root), random.Random(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    kinds = ["image", "two_images", "video", "multi_turn", "text"]
    if not with_video:
        kinds.remove("video")
    else:
        write_video(root / "videos" / "clip.mp4", seed=seed)
    rows = []
    for i in range(num_rows):
        kind = kinds[i % len(kinds)]
        media = []
        for j in range({"image": 1, "two_images": 2, "multi_turn": 1}.get(kind, 0)):
            name = f"images/{i}_{j}.png"
            (root / name).write_bytes(png(rng))
            media.append({"type": "image", "image": name})
        if kind == "video":
            media.append({"type": "video", "video": "videos/clip.mp4"})
        messages = [{"role": "system", "content": [{"type": "text", "text": "You answer briefly."}]}] \
            if kind == "multi_turn" else []
        messages += [{"role": "user", "content": media + [{"type": "text", "text": f"Describe the {phrase(rng, 1)}."}]},
                     {"role": "assistant", "content": [{"type": "text", "text": phrase(rng, 3)}]}]
        if kind == "multi_turn":
            messages += [{"role": "user", "content": [{"type": "text", "text": "What colour?"}]},
                         {"role": "assistant", "content": [{"type": "text", "text": phrase(rng, 1)}]}]
        rows.append({"messages": messages})
    path = root / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


SPEC = DatasetSpec(
    name="custom",
    to_conversation=to_conversation,
    metric=free_text_scores,
    metric_names=("exact_match", "token_f1"),
    write_fixture=write_fixture,
    launch_args=("model=tiny_qwen2_5_vl",),
)
