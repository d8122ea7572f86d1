"""Generate answers from a fine-tuned checkpoint, an exported dir or a hub model.

    python -m vlm_sweep.generate --checkpoint-path <dir|hub id> --prompt "Describe this image." \\
        --image receipt.png [--image more.png ...] [--video clip.mp4] --max-new-tokens 200 \\
        --output-format text|json [--output-file out.json]
    python -m vlm_sweep.generate --checkpoint-path <dir> --input-jsonl rows.jsonl --output-file out.jsonl

Greedy by default; --do-sample with --temperature/--top-p/--top-k samples. ``json`` output
parses CORD-style tag sequences with token2json. In batch mode each input row
``{"image": path | [paths], "video": path, "prompt": text}`` gives one output JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional


def _parse(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m vlm_sweep.generate", description="Generate with a VLM.")
    p.add_argument("--checkpoint-path", required=True, help="run/checkpoint/step/model dir or hub id")
    p.add_argument("--prompt", default="Describe this image.")
    p.add_argument("--image", action="append", default=[], help="image path (repeat for several)")
    p.add_argument("--video", default=None, help="video path (decoded with PyAV)")
    p.add_argument("--num-frames", type=int, default=10, help="frames sampled uniformly from --video")
    p.add_argument("--input-jsonl", default=None, help="batch mode: rows of {image, prompt[, video]}")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--do-sample", action="store_true")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-format", choices=["text", "json"], default="text")
    p.add_argument("--output-file", default=None)
    p.add_argument("--dtype", default=None, help="override the model dtype (float32, bfloat16, ...)")
    return p.parse_args(argv)


def _row_conversation(row: Dict[str, Any], base: Path, num_frames: int) -> Any:
    from vlm_sweep.data.media import load_video_frames, open_image
    from vlm_sweep.generation import user_turn

    images = row.get("image") or []
    images = [images] if isinstance(images, str) else images
    resolve = lambda p: p if Path(p).is_absolute() else base / p  # noqa: E731
    video = load_video_frames(resolve(row["video"]), num_frames) if row.get("video") else None
    return user_turn(row.get("prompt", "Describe this image."), [open_image(resolve(i)) for i in images], video)


def _format(text: str, output_format: str) -> Any:
    if output_format == "json":
        from vlm_sweep.data.cord import token2json

        return token2json(text)
    return text


def video_problem(family_name: str, rows: List[Dict[str, Any]], input_jsonl: Optional[str]) -> Optional[str]:
    """One line when a row asks for video but the model's family takes none (else None)."""
    from vlm_sweep.models.registry import MODEL_FAMILIES, get_family

    with_video = [i for i, row in enumerate(rows) if row.get("video")]
    if not with_video or get_family(family_name).supports_video:
        return None
    where = f"{input_jsonl} row {with_video[0] + 1} has a video" if input_jsonl else "--video"
    capable = ", ".join(sorted(n for n, f in MODEL_FAMILIES.items() if f.supports_video))
    return (f"error: {where}, but this checkpoint is a {family_name} model, which takes no video input; "
            f"use a checkpoint of a video-capable family ({capable})")


def main(argv: Optional[List[str]] = None) -> int:
    args = _parse(argv)
    from vlm_sweep.console import silence_known_noise
    from vlm_sweep.data.media import MediaError

    silence_known_noise()

    try:
        if args.input_jsonl:
            path = Path(args.input_jsonl)
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            conversations = [_row_conversation(r, path.parent, args.num_frames) for r in rows]
        else:
            rows = [{"image": args.image, "video": args.video, "prompt": args.prompt}]
            conversations = [_row_conversation(rows[0], Path.cwd(), args.num_frames)]
    except (MediaError, json.JSONDecodeError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    import torch

    from vlm_sweep.generation import SamplingConfig, generate
    from vlm_sweep.inference import load_for_inference
    from vlm_sweep.models.load import ModelLoadError

    torch.manual_seed(args.seed)
    try:
        loaded = load_for_inference(args.checkpoint_path, dtype=args.dtype)
    except ModelLoadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    problem = video_problem(loaded.family, rows, args.input_jsonl)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                              temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    from vlm_sweep.data.processor_kwargs import MediaKwargs

    budget = (loaded.run_config or {}).get("dataset", {})  # the pixel budget the model trained with
    media = MediaKwargs(loaded.processor, budget.get("min_pixels"), budget.get("max_pixels"))
    answers: List[str] = []
    for i in range(0, len(conversations), args.batch_size):
        answers += generate(loaded.model, loaded.processor, conversations[i:i + args.batch_size], sampling,
                            media_kwargs=media)

    if args.input_jsonl:
        lines = [json.dumps({**row, "output": _format(a, args.output_format)}) for row, a in zip(rows, answers)]
        text = "\n".join(lines) + "\n"
    elif args.output_format == "json":
        text = json.dumps(_format(answers[0], "json"), indent=2, ensure_ascii=False) + "\n"
    else:
        text = answers[0] + "\n"
    if args.output_file:
        Path(args.output_file).write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
