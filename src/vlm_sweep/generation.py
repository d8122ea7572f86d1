"""Batched generation from conversations: shared by the CLI, evaluation and the training loop."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

Conversation = List[Dict[str, Any]]


@dataclass
class SamplingConfig:
    max_new_tokens: int = 256
    do_sample: bool = False  # greedy by default: reproducible evaluation
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
