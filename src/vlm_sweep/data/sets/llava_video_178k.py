"""lmms-lab/LLaVA-Video-178K: video question answering (subset 0_30_s_nextqa by default).

Records: ``{id, video, conversations: [{from: human|gpt, value}], data_source}``. Human turns
become user turns (the first carries the video), gpt turns assistant turns; ``<image>``/``<video>``
markers are stripped because the processor places the media itself. NExT-QA mixes open-ended and
multiple-choice answers in one split, so the metric reports accuracy over both and each kind.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any, Dict, List

from vlm_sweep.data.fixture_parts import phrase, write_card, write_video
from vlm_sweep.data.formats import Conversation, load_video, resolve_media, text_part, text_value, turn
from vlm_sweep.data.sets import DatasetSpec
from vlm_sweep.metrics.vqa import choice_scores

SUBSET = "0_30_s_nextqa"
MC_SUFFIX = "\nPlease answer with the option's letter from the given choices directly."
_PLACEHOLDER = re.compile(r"<(?:image|video)>\n?")
_SPEAKERS = {"human": "user", "gpt": "assistant", "system": "system"}


def strip_placeholders(text: str) -> str:
    """Drop LLaVA's ``<image>``/``<video>`` markers: the processor places the media itself."""
    return re.sub(r"[ \t]{2,}", " ", _PLACEHOLDER.sub("", text)).strip()


def to_conversation(record: Dict[str, Any], dataset_cfg: Any) -> Conversation:
    """Human/gpt turns; the first human turn carries the video.

    ``video`` is relative to ``dataset.video_root_path`` (where the subset's tarballs were extracted).
    """
    turns = record.get("conversations") or []
    if not turns:
        raise ValueError("conversations are missing")
    conversation: Conversation = []
    for i, source in enumerate(turns):
        role = _SPEAKERS.get((source or {}).get("from"))
        if role is None:
            raise ValueError(f"conversations[{i}] has unknown speaker {(source or {}).get('from')!r}")
        text = text_value(strip_placeholders(source.get("value") or ""), f"conversations[{i}].value")
        conversation.append(turn(role, text_part(text)))
    first_user = next((message for message in conversation if message["role"] == "user"), None)
    if first_user is None:
        raise ValueError("no human turn to carry the video")
    path = resolve_media(record.get("video"), dataset_cfg.video_root_path, "dataset.video_root_path", "'video'")
    first_user["content"].insert(0, {"type": "video", "video": load_video(path, dataset_cfg)})
    return conversation


def write_fixture(root: str | Path, num_videos: int = 4, num_frames: int = 16, seed: int = 0) -> Path:
    """The card's configs, the subset's ``*_oe_qa_processed.json`` / ``*_mc_qa_processed.json``, and its
    videos extracted in place (``<root>/0_30_s_nextqa/NextQA/NExTVideo/...``, the yaml's default
    ``video_root_path``).

    Open-ended records alternate one and two question turns; multiple-choice answers are ``"B."``.
    """
    root, rng = Path(root), random.Random(seed)
    subset = root / SUBSET
    videos = [f"NextQA/NExTVideo/0000/{4000 + i}.mp4" for i in range(num_videos)]
    for i, video in enumerate(videos):
        write_video(subset / video, num_frames=num_frames, seed=seed + i)
    open_ended: List[dict] = []
    multi_choice: List[dict] = []
    for i, video in enumerate(videos):
        turns = [{"from": "human", "value": f"<image>\nWhat is the {phrase(rng, 1)} doing?"},
                 {"from": "gpt", "value": f"The {phrase(rng, 2)}."}]
        if i % 2:
            turns += [{"from": "human", "value": "And then?"}, {"from": "gpt", "value": phrase(rng, 2)}]
        open_ended.append({"id": f"oe_{i}", "video": video, "conversations": turns, "data_source": SUBSET})
        options = "\n".join(f"{letter}. {phrase(rng, 2)}" for letter in "ABCDE")
        letter = rng.choice("ABCDE")
        multi_choice.append({"id": f"mc_{i}", "video": video, "data_source": SUBSET, "conversations": [
            {"from": "human", "value": f"<image>\nWhat happens next?\n{options}{MC_SUFFIX}"},
            {"from": "gpt", "value": f"{letter}."}]})
    (subset / f"{SUBSET}_oe_qa_processed.json").write_text(json.dumps(open_ended, indent=1))
    (subset / f"{SUBSET}_mc_qa_processed.json").write_text(json.dumps(multi_choice, indent=1))
    write_card(root, SUBSET, {"open_ended": f"{SUBSET}/*oe*.json", "multi_choice": f"{SUBSET}/*mc*.json"})
    return root


SPEC = DatasetSpec(
    name="llava_video_178k",
    to_conversation=to_conversation,
    metric=choice_scores,
    metric_names=("accuracy", "mc_accuracy", "open_exact_match", "open_token_f1"),
    write_fixture=write_fixture,
    launch_args=("model=tiny_qwen2_5_vl",),
)
