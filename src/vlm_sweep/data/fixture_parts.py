"""What every data set's fixture writer shares: seeded images, phrases, parquet written with
the hub's ``datasets.Features``, dataset cards, and real mp4 videos.

Kept apart from the CLI in ``vlm_sweep.data.fixtures`` so the writers in
``vlm_sweep.data.sets`` never import the module that imports them. Tests use ``write_video``
for media of their own.
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Dict, Tuple

WORDS = ("red green blue small large left right top bottom circle square triangle lesion mass "
         "fracture normal chest brain knee axial contrast man woman dog ball table run jump").split()


def png(rng: random.Random, size: Tuple[int, int] = (64, 48)) -> bytes:
    """A small PNG: a coloured background with a rectangle, so images differ visibly."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    x, y = rng.randrange(size[0] // 2), rng.randrange(size[1] // 2)
    ImageDraw.Draw(image).rectangle([x, y, x + size[0] // 3, y + size[1] // 3],
                                    fill=tuple(rng.randrange(256) for _ in range(3)))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def phrase(rng: random.Random, n: int) -> str:
    """``n`` random words: answers and questions that differ row to row."""
    return " ".join(rng.choice(WORDS) for _ in range(n))


def to_parquet(rows: Dict[str, list], features: object, path: Path) -> None:
    """Rows written with the hub's ``datasets.Features``, so loading restores the same types."""
    from datasets import Dataset

    path.parent.mkdir(parents=True, exist_ok=True)
    Dataset.from_dict(rows, features=features).to_parquet(str(path))


def write_card(root: Path, config_name: str, data_files: Dict[str, str]) -> None:
    """``root/README.md``, a dataset card whose YAML config makes ``load_dataset(root, name=config_name,
    split=...)`` work; ``data_files``: split -> path glob under ``root``, as the hub repo lays them out."""
    files = "".join(f"  - split: {split}\n    path: {path}\n" for split, path in data_files.items())
    (root / "README.md").write_text(f"---\nconfigs:\n- config_name: {config_name}\n  data_files:\n{files}---\n"
                                    "# Offline fixture written by vlm_sweep.data.fixtures\n")


def video_encoder() -> str:
    """An mp4 video encoder the installed PyAV wheel has."""
    import av

    for codec in ("libx264", "mpeg4"):
        if codec in av.codecs_available:
            return codec
    raise RuntimeError("PyAV has neither libx264 nor mpeg4 to write test videos")


def write_video(path: str | Path, num_frames: int = 16, size: int = 64, fps: int = 8, seed: int = 0) -> Path:
    """A real mp4: a white square moving across coloured noise (so frames differ)."""
    import av
    import numpy as np

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    background = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(video_encoder(), rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.options = {"g": "4"}  # a keyframe every 4 frames: seeking has something to skip
        side = max(size // 4, 2)
        for i in range(num_frames):
            frame = background.copy()
            x = (i * (size - side)) // max(num_frames - 1, 1)
            frame[size // 3: size // 3 + side, x: x + side] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
