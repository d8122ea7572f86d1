"""Tiny offline copies of every data set, in each hub repo's own schema and layout.

The loaders cannot tell these from a download: parquet with the hub's ``datasets.Features``
(MedPix-VQA, the_cauldron/raven), JSON plus real mp4 files (LLaVA-Video-178K), and a
JSONL in the ``custom`` conversation format. Tests train on them, and so can you:

    python -m vlm_sweep.data.fixtures medpix_vqa /tmp/medpix
    python launch.py dataset=medpix_vqa dataset.path=/tmp/medpix   # the command it prints

Content is random but seeded: the same arguments write the same rows.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

_WORDS = ("red green blue small large left right top bottom circle square triangle lesion mass "
          "fracture normal chest brain knee axial contrast man woman dog ball table run jump").split()


def _png(rng: random.Random, size=(64, 48)) -> bytes:
    """A small PNG: a coloured background with a rectangle, so images differ visibly."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    x, y = rng.randrange(size[0] // 2), rng.randrange(size[1] // 2)
    ImageDraw.Draw(image).rectangle([x, y, x + size[0] // 3, y + size[1] // 3],
                                    fill=tuple(rng.randrange(256) for _ in range(3)))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _phrase(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n))


def _to_parquet(rows: Dict[str, list], features: object, path: Path) -> None:
    from datasets import Dataset

    path.parent.mkdir(parents=True, exist_ok=True)
    Dataset.from_dict(rows, features=features).to_parquet(str(path))


def _readme(configs: str) -> str:
    """A dataset card whose YAML ``configs`` make ``load_dataset(dir, name=..., split=...)`` work."""
    return f"---\nconfigs:\n{configs}---\n# Offline fixture written by vlm_sweep.data.fixtures\n"


# ---------------------------------------------------------------- MedPix-VQA


def write_medpix_vqa(root: str | Path, num_train: int = 12, num_validation: int = 4, seed: int = 0) -> Path:
    """mmoukouba/MedPix-VQA: ``data/{train,validation}-*.parquet``, ``image_id`` an Image feature."""
    from datasets import Features, Image, Value

    root, rng = Path(root), random.Random(seed)
    features = Features({"image_id": Image(), "mode": Value("string"), "case_id": Value("string"),
                         "question": Value("string"), "answer": Value("string")})
    for split, count in (("train", num_train), ("validation", num_validation)):
        rows: Dict[str, list] = {name: [] for name in features}
        for i in range(count):
            rows["image_id"].append({"bytes": _png(rng), "path": None})
            rows["mode"].append(rng.choice(["CT", "MRI", "X-ray"]))
            rows["case_id"].append(f"MPX{1000 + i}")
            rows["question"].append(f"What does the {rng.choice(['CT', 'MRI'])} show in the {_phrase(rng, 1)}?")
            rows["answer"].append(_phrase(rng, rng.randint(1, 3)))
        _to_parquet(rows, features, root / "data" / f"{split}-00000-of-00001.parquet")
    return root


# ---------------------------------------------------------------- the_cauldron / raven

RAVEN_INCOMPLETE_ROWS = 3


def write_raven(root: str | Path, num_rows: int = 24, seed: int = 0) -> Path:
    """HuggingFaceM4/the_cauldron, subset raven: ``raven/train-*.parquet`` + the card's configs.

    The last three rows are incomplete (no images; no texts; an empty answer), as the
    loader must drop them: ``RAVEN_INCOMPLETE_ROWS``.
    """
    from datasets import Features, Image, List, Value

    root, rng = Path(root), random.Random(seed)
    features = Features({"images": List(Image()), "texts": List({"user": Value("string"),
                                                                   "assistant": Value("string"),
                                                                   "source": Value("string")})})
    images, texts = [], []
    for _ in range(num_rows - RAVEN_INCOMPLETE_ROWS):
        images.append([{"bytes": _png(rng), "path": None} for _ in range(rng.randint(1, 3))])
        letter = rng.choice("ABCDEFGH")
        texts.append([{"user": "Which figure should complete the logical sequence? Choices: A B C D E F G H",
                       "assistant": f"Answer: {letter}", "source": "raven"}])
    images += [[], [{"bytes": _png(rng), "path": None}], [{"bytes": _png(rng), "path": None}]]
    texts += [[{"user": "Which figure?", "assistant": "Answer: A", "source": "raven"}], [],
              [{"user": "Which figure?", "assistant": "", "source": "raven"}]]
    _to_parquet({"images": images, "texts": texts}, features, root / "raven" / "train-00000-of-00001.parquet")
    (root / "README.md").write_text(_readme(
        "- config_name: raven\n  data_files:\n  - split: train\n    path: raven/train-*\n"))
    return root


# ---------------------------------------------------------------- LLaVA-Video-178K


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


LLAVA_SUBSET = "0_30_s_nextqa"
LLAVA_MC_SUFFIX = "\nPlease answer with the option's letter from the given choices directly."


def write_llava_video(root: str | Path, num_videos: int = 4, num_frames: int = 16, seed: int = 0) -> Path:
    """lmms-lab/LLaVA-Video-178K, subset 0_30_s_nextqa: the card's configs, the subset's
    ``*_oe_qa_processed.json`` / ``*_mc_qa_processed.json``, and its videos extracted in place
    (``<root>/0_30_s_nextqa/NextQA/NExTVideo/...``, the yaml's default ``video_root_path``).

    Open-ended records alternate one and two question turns; multiple-choice answers are ``"B."``.
    """
    root, rng = Path(root), random.Random(seed)
    subset = root / LLAVA_SUBSET
    videos = [f"NextQA/NExTVideo/0000/{4000 + i}.mp4" for i in range(num_videos)]
    for i, video in enumerate(videos):
        write_video(subset / video, num_frames=num_frames, seed=seed + i)
    open_ended: List[dict] = []
    multi_choice: List[dict] = []
    for i, video in enumerate(videos):
        turns = [{"from": "human", "value": f"<image>\nWhat is the {_phrase(rng, 1)} doing?"},
                 {"from": "gpt", "value": f"The {_phrase(rng, 2)}."}]
        if i % 2:
            turns += [{"from": "human", "value": "And then?"}, {"from": "gpt", "value": _phrase(rng, 2)}]
        open_ended.append({"id": f"oe_{i}", "video": video, "conversations": turns, "data_source": LLAVA_SUBSET})
        options = "\n".join(f"{letter}. {_phrase(rng, 2)}" for letter in "ABCDE")
        letter = rng.choice("ABCDE")
        multi_choice.append({"id": f"mc_{i}", "video": video, "data_source": LLAVA_SUBSET, "conversations": [
            {"from": "human", "value": f"<image>\nWhat happens next?\n{options}{LLAVA_MC_SUFFIX}"},
            {"from": "gpt", "value": f"{letter}."}]})
    (subset / f"{LLAVA_SUBSET}_oe_qa_processed.json").write_text(json.dumps(open_ended, indent=1))
    (subset / f"{LLAVA_SUBSET}_mc_qa_processed.json").write_text(json.dumps(multi_choice, indent=1))
    (root / "README.md").write_text(_readme(
        f"- config_name: {LLAVA_SUBSET}\n  data_files:\n"
        f"  - split: open_ended\n    path: {LLAVA_SUBSET}/*oe*.json\n"
        f"  - split: multi_choice\n    path: {LLAVA_SUBSET}/*mc*.json\n"))
    return root


# ---------------------------------------------------------------- custom


def write_custom(root: str | Path, num_rows: int = 12, with_video: bool = True, seed: int = 0) -> Path:
    """``<root>/train.jsonl`` in the custom conversation format; media under ``images/``, ``videos/``.

    Rows cycle through: one image; two images; a video (if ``with_video``); a system turn
    and two question/answer rounds; text only. Returns the data file's path.
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
            (root / name).write_bytes(_png(rng))
            media.append({"type": "image", "image": name})
        if kind == "video":
            media.append({"type": "video", "video": "videos/clip.mp4"})
        messages = [{"role": "system", "content": [{"type": "text", "text": "You answer briefly."}]}] \
            if kind == "multi_turn" else []
        messages += [{"role": "user", "content": media + [{"type": "text", "text": f"Describe the {_phrase(rng, 1)}."}]},
                     {"role": "assistant", "content": [{"type": "text", "text": _phrase(rng, 3)}]}]
        if kind == "multi_turn":
            messages += [{"role": "user", "content": [{"type": "text", "text": "What colour?"}]},
                         {"role": "assistant", "content": [{"type": "text", "text": _phrase(rng, 1)}]}]
        rows.append({"messages": messages})
    path = root / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


WRITERS: Dict[str, Callable[..., Path]] = {
    "medpix_vqa": write_medpix_vqa,
    "raven": write_raven,
    "llava_video_178k": write_llava_video,
    "custom": write_custom,
}
# What to add to a launch command to train on a written fixture.
_MODEL = {"llava_video_178k": "model=tiny_qwen2_5_vl ", "custom": "model=tiny_qwen2_5_vl "}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlm_sweep.data.fixtures",
                                     description="Write a tiny offline copy of a data set.")
    parser.add_argument("dataset", choices=sorted(WRITERS))
    parser.add_argument("directory")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = WRITERS[args.dataset](args.directory, seed=args.seed)
    print(f"wrote {args.dataset} to {path}")
    print(f"train on it: python launch.py {_MODEL.get(args.dataset, '')}dataset={args.dataset} "
          f"dataset.path={Path(path).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
