"""Per-call processor kwargs for media: pixel budgets and video timing.

Two things a conversation alone cannot tell a processor:

* the pixel budget (``dataset.min_pixels`` / ``dataset.max_pixels``) for processors
  that size images by pixel count. A (sub-)processor says it does by declaring
  ``min_pixels``/``max_pixels`` among its ``valid_kwargs``; transformers 5 reads the
  budget per call from ``size={"shortest_edge": min, "longest_edge": max}`` (passing
  ``min_pixels`` itself is deprecated), so that is what is sent. A processor that
  does not size by pixel count gets a config error instead of a silent no-op;
* how video frames were sampled (``VideoFrames.metadata``), so a processor that
  times frames (Qwen2.5-VL's ``second_per_grid_ts``, Qwen3-VL's timestamps) sees the
  real rate, not its 24 fps default; and that they were (``do_sample_frames=False``),
  so a processor that samples frames by default does not sample them again.

Used by the collator for training batches; generation should use it too so
evaluation sees images at the same size as training.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

_BUDGET_KEYS = {"min_pixels": "shortest_edge", "max_pixels": "longest_edge"}


def _valid_kwargs(subprocessor: Any) -> set:
    return set(getattr(getattr(subprocessor, "valid_kwargs", None), "__annotations__", {}))


def pixel_budget_kwargs(subprocessor: Any, budget: Dict[str, int]) -> Dict[str, Any]:
    """The kwargs that put ``budget`` ({min_pixels, max_pixels}, set ones only) on one sub-processor."""
    if not budget:
        return {}
    size = getattr(subprocessor, "size", None) or {}
    read = size.get if isinstance(size, dict) else lambda key: getattr(size, key, None)
    current = {key: read(key) for key in _BUDGET_KEYS.values()}
    if all(value is not None for value in current.values()):
        for key, value in budget.items():
            current[_BUDGET_KEYS[key]] = value
        return {"size": current}
    return dict(budget)


class MediaKwargs:
    """Callable: conversations -> ``processor_kwargs`` entries for their images and videos."""

    def __init__(self, processor: Any, min_pixels: Optional[int] = None, max_pixels: Optional[int] = None) -> None:
        budget = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
        image_processor = getattr(processor, "image_processor", None)
        self.video_processor = getattr(processor, "video_processor", None)
        self.processor_name = type(processor).__name__
        for key, value in budget.items():
            if key not in _valid_kwargs(image_processor):
                raise ValueError(
                    f"config error: dataset.{key}={value} is set but {type(image_processor).__name__} does "
                    f"not size images by pixel count (it takes no {key!r}); unset it, or bound images "
                    f"with dataset.max_image_side")
        self.images_kwargs = pixel_budget_kwargs(image_processor, budget)
        video_budget = {k: v for k, v in budget.items() if k in _valid_kwargs(self.video_processor)}
        self.videos_kwargs = pixel_budget_kwargs(self.video_processor, video_budget)

    def __call__(self, conversations: Sequence[Sequence[Dict[str, Any]]]) -> Dict[str, Any]:
        videos = videos_in(conversations)
        if videos and self.video_processor is None:
            from vlm_sweep.models.registry import tiny_model_configs

            raise ValueError(f"{self.processor_name} cannot take videos; train video data sets with a "
                             f"video-capable model (e.g. model={' or '.join(tiny_model_configs(video=True))})")
        out: Dict[str, Any] = {}
        if self.images_kwargs:
            out["images_kwargs"] = dict(self.images_kwargs)
        videos_kwargs = dict(self.videos_kwargs)
        if videos:
            videos_kwargs["video_metadata"] = [video_metadata(video) for video in videos]
            # The frames are already sampled (dataset.num_frames / fps): a processor that samples by default
            # (Qwen3-VL's) would index them with the source video's frame numbers from the metadata.
            videos_kwargs["do_sample_frames"] = False
        if videos_kwargs:
            out["videos_kwargs"] = videos_kwargs
        return out


def videos_in(conversations: Sequence[Sequence[Dict[str, Any]]]) -> List[Any]:
    """Every video part's frames, in the order the processor will see them."""
    return [part["video"] for conversation in conversations for turn in conversation
            if not isinstance(turn.get("content"), str)
            for part in turn["content"] if part.get("type") == "video"]


def video_metadata(video: Any) -> Dict[str, Any]:
    """The frames' sampling metadata; for bare frames, what transformers itself would assume."""
    metadata = getattr(video, "metadata", None)
    if metadata:
        return dict(metadata)
    return {"total_num_frames": len(video), "fps": None, "frames_indices": list(range(len(video)))}
