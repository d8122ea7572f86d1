"""Record formats: how one record of a source data set becomes a conversation.

A conversation is the chat-template form every processor takes:
``[{"role": "user", "content": [{"type": "image", "image": PIL}, {"type": "text", ...}]},
{"role": "assistant", "content": [{"type": "text", "text": answer}]}]``.
Adding a data set schema means adding one function here.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List

Conversation = List[Dict[str, Any]]


def cord_v2(record: Dict[str, Any], dataset_cfg: Any) -> Conversation:
    """naver-clova-ix/cord-v2: image + ground_truth JSON -> Donut token string."""
    from vlm_sweep.data.cord import cord_record_to_conversation

    return cord_record_to_conversation(record, prompt=dataset_cfg.prompt)


RECORD_FORMATS: Dict[str, Callable[[Dict[str, Any], Any], Conversation]] = {
    "cord_v2": cord_v2,
}


def assistant_texts(conversation: Conversation) -> List[str]:
    """The assistant turns' text, in order (what the labels must equal)."""
    return [
        "".join(part["text"] for part in turn["content"] if part.get("type") == "text")
        for turn in conversation
        if turn["role"] == "assistant"
    ]
