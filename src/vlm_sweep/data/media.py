"""Open images and videos named by a path, with errors that name the file.

Videos are decoded with PyAV by seeking: only the frames that are kept, plus the
frames between each one and the keyframe before it, are decoded, so a long video
costs about as much as a short one. The container's index says where keyframes
are; a seek happens only when it skips frames that would otherwise be decoded.
"""

from __future__ import annotations

from vlm_sweep.errors import MediaError  # noqa: F401 (defined there, re-exported here)

import bisect
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

# Without a keyframe index, seek when the next kept frame is further ahead than this.
_SEEK_GAP_S = 2.0




class _NoTimestamps(Exception):
    """Frames without presentation timestamps cannot be found by seeking."""


class VideoFrames(list):
    """Sampled RGB frames (a list of PIL images, what processors take) and where they came from.

    ``metadata`` uses transformers' ``VideoMetadata`` fields, so a processor that
    times frames (Qwen2.5-VL's ``second_per_grid_ts``) sees the real sampling rate
    instead of its 24 fps default.
    """

    def __init__(self, frames: Sequence[Any], metadata: Dict[str, Any]) -> None:
        super().__init__(frames)
        self.metadata = metadata


# Modes with an alpha band; PIL's convert("RGB") just drops it, leaving what was under it (often black).
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}


def to_rgb(image: Any) -> Any:
    """A fully decoded 8-bit RGB copy of ``image``, as a person sees it on screen.

    PIL's ``convert("RGB")`` is right for 8-bit colour and palette modes but not for:

    * transparency (an alpha band, or a palette/greyscale ``transparency`` entry): composited
      on WHITE, the page a viewer shows, so black ink on a transparent page stays readable;
    * ``I;16*`` (16-bit greyscale): scaled by 255/65535 (``/257``), where PIL clips at 255;
    * ``I`` (32-bit int): 16-bit PNGs and TIFFs often open as ``I``, so values within
      0..65535 are taken as 16-bit (``/257``); otherwise the image's own min..max is
      stretched to 0..255;
    * ``F`` (32-bit float): values within 0..1 are taken as a 0..1 range (``x255``),
      otherwise as 0..255; out-of-range values are clipped.
    """
    from PIL import Image

    mode = image.mode
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_grey_to_uint8(image), "L").convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = (image.convert("LA") if mode == "La" else image).convert("RGBA")
        page = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(page, rgba).convert("RGB")
    return image.convert("RGB")  # also forces the full decode: truncated files fail here


def _grey_to_uint8(image: Any) -> Any:
    """A 16/32-bit or float greyscale image's pixels as uint8, scaled by the mode's value range."""
    import numpy as np

    values = np.asarray(image)
    if image.mode == "F":
        values = values.astype(np.float64)
        finite = values[np.isfinite(values)]
        scale = 255.0 if finite.size and finite.max() <= 1.0 else 1.0
        scaled = np.nan_to_num(values * scale, nan=0.0, posinf=255.0, neginf=0.0)
    elif image.mode.startswith("I;16") or (values.min(initial=0) >= 0 and values.max(initial=0) <= 65535):
        scaled = values.astype(np.float64) / 257.0
    else:
        low, high = float(values.min()), float(values.max())
        scaled = (values.astype(np.float64) - low) * (255.0 / (high - low or 1.0))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def open_image(path: str | Path) -> Any:
    """A fully decoded RGB PIL image (``to_rgb``: transparency on white, 16-bit scaled)."""
    from PIL import Image

    path = Path(path)
    if not path.exists():
        raise MediaError(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            return to_rgb(image)
    except Exception as err:
        raise MediaError(f"cannot decode image {path}: {err}") from err


def shrink_image(image: Any, max_side: Optional[int]) -> Any:
    """The image with its longer side at most ``max_side`` (aspect kept); small images untouched."""
    if not max_side or max(image.size) <= max_side:
        return image
    from PIL import Image

    scale = max_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC)


def frame_indices(total: int, rate: float, num_frames: Optional[int], fps: Optional[float]) -> List[int]:
    """Which of ``total`` frames to keep: ``fps`` per second if set, else ``num_frames`` spread uniformly."""
    if total <= 0:
        return []
    if fps:
        step = max(rate / fps, 1.0)
        return [int(i) for i in _arange(0.0, float(total), step)]
    count = min(num_frames or total, total)
    if count == 1:
        return [0]
    return [round(i * (total - 1) / (count - 1)) for i in range(count)]


def _arange(start: float, stop: float, step: float) -> List[float]:
    return [start + k * step for k in range(max(1, math.ceil((stop - start) / step)))]


def load_video_frames(path: str | Path, num_frames: Optional[int] = 10,
                      fps: Optional[float] = None) -> VideoFrames:
    """RGB frames sampled uniformly (``num_frames``) or at ``fps`` frames per second, via PyAV."""
    import av

    path = Path(path)
    if not path.exists():
        raise MediaError(f"video not found: {path}")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaError(f"no video stream in {path}")
            stream = container.streams.video[0]
            rate = float(stream.average_rate or stream.guessed_rate or 0) or 24.0
            total = _frame_count(container, stream, rate)
            frames = None
            if total > 0:
                indices = frame_indices(total, rate, num_frames, fps)
                try:
                    frames = _decode_by_seeking(container, stream, indices, rate)
                except _NoTimestamps:
                    container.seek(0)
            if frames is None:
                frames, indices, total = _decode_sequentially(container, stream, rate, num_frames, fps)
            width, height = stream.codec_context.width, stream.codec_context.height
    except MediaError:
        raise
    except Exception as err:
        raise MediaError(f"cannot decode video {path}: {err}") from err
    if not frames:
        raise MediaError(f"video has no frames: {path}")
    metadata = {"total_num_frames": total, "fps": rate, "duration": total / rate,
                "frames_indices": indices, "width": width, "height": height, "video_backend": "pyav"}
    return VideoFrames(frames, metadata)


def _frame_count(container: Any, stream: Any, rate: float) -> int:
    """Frames in the stream from its header, else estimated from the duration (0: unknown)."""
    if stream.frames:
        return int(stream.frames)
    if stream.duration and stream.time_base:
        return int(round(float(stream.duration * stream.time_base) * rate))
    if container.duration:
        import av

        return int(round(container.duration / av.time_base * rate))
    return 0


def _decode_by_seeking(container: Any, stream: Any, indices: List[int], rate: float) -> List[Any]:
    """Frames at ``indices`` (in that order), decoding forward from the nearest keyframe."""
    time_base = float(stream.time_base)
    start = stream.start_time or 0
    to_pts = lambda i: start + int(round(i / rate / time_base))  # noqa: E731
    half_frame = 0.5 / rate / time_base
    keyframes = sorted(e.timestamp for e in stream.index_entries if e.is_keyframe)
    decoded: Dict[int, Any] = {}
    decoder, last, position = None, None, -math.inf
    for index in sorted(set(indices)):
        target = to_pts(index)
        if keyframes:
            before = keyframes[max(bisect.bisect_right(keyframes, target) - 1, 0)]
            seek = decoder is None or before > position
        else:
            seek = decoder is None or target - position > _SEEK_GAP_S / time_base
        if seek:
            container.seek(max(int(target), 0), stream=stream, backward=True, any_frame=False)
            decoder = container.decode(stream)
        for frame in decoder:
            if frame.pts is None:
                raise _NoTimestamps
            last, position = frame, frame.pts
            if frame.pts + half_frame >= target:
                break
        if last is None:
            raise RuntimeError("no frame could be decoded")
        decoded[index] = last.to_image()  # past the end: the last frame stands in
    return [decoded[i] for i in indices]


def _decode_sequentially(container: Any, stream: Any, rate: float, num_frames: Optional[int],
                         fps: Optional[float]) -> tuple:
    """For streams whose length is unknown up front: decode everything, then sample."""
    frames = [frame.to_image() for frame in container.decode(stream)]
    indices = frame_indices(len(frames), rate, num_frames, fps)
    return [frames[i] for i in indices], indices, len(frames)
