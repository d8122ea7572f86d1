"""Open images and videos named by a path, with errors that name the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional


class MediaError(ValueError):
    """An image or video is missing or cannot be decoded."""


def open_image(path: str | Path) -> Any:
    """A fully decoded RGB PIL image."""
    from PIL import Image

    path = Path(path)
    if not path.exists():
        raise MediaError(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except Exception as err:
        raise MediaError(f"cannot decode image {path}: {err}") from err


def load_video_frames(path: str | Path, num_frames: Optional[int] = 10, fps: Optional[float] = None) -> List[Any]:
    """RGB PIL frames sampled uniformly (``num_frames``) or at ``fps`` frames per second, via PyAV."""
    import av
    import numpy as np

    path = Path(path)
    if not path.exists():
        raise MediaError(f"video not found: {path}")
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            frames = [f.to_image() for f in container.decode(stream)]
            rate = float(stream.average_rate or 0) or 24.0
    except Exception as err:
        raise MediaError(f"cannot decode video {path}: {err}") from err
    if not frames:
        raise MediaError(f"video has no frames: {path}")
    if fps:
        step = max(rate / fps, 1.0)
        indices = np.arange(0, len(frames), step).astype(int)
    else:
        count = min(num_frames or len(frames), len(frames))
        indices = np.linspace(0, len(frames) - 1, count).round().astype(int)
    return [frames[i] for i in indices]
