"""Generate answers from a fine-tuned checkpoint, an exported dir or a hub model.

    python -m vlm_sweep.cli.generate --checkpoint <dir|hub id> --prompt "Describe this image." \\
        --image receipt.png [--image more.png ...] [--video clip.mp4] [--max-new-tokens 256] \\
        --output-format text|json [--output-file out.json]
    python -m vlm_sweep.cli.generate --checkpoint <dir> --input-jsonl rows.jsonl --output-file out.jsonl

Greedy by default; --do-sample with --temperature/--top-p/--top-k samples. ``json`` output
parses CORD-style tag sequences with token2json. In batch mode each input row
``{"image": path | [paths], "video": path, "prompt": text}`` gives one output JSON line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from vlm_sweep.cli.args import GENERATE, build_parser, sampling_config
from vlm_sweep.cli.user_errors import run_command


def _inputs(args: Any) -> tuple[List[Dict[str, Any]], List[Any]]:
    """(rows, conversations): the --input-jsonl rows, or the one row the flags describe."""
    from vlm_sweep.inference.generate import read_rows, row_conversation

    if args.input_jsonl:
        rows = read_rows(args.input_jsonl)
        base = Path(args.input_jsonl).parent
        return rows, [row_conversation(row, base, args.num_frames) for row in rows]
    rows = [{"image": args.image, "video": args.video, "prompt": args.prompt}]
    return rows, [row_conversation(rows[0], Path.cwd(), args.num_frames)]


def _render(args: Any, rows: List[Dict[str, Any]], answers: List[str]) -> str:
    """What is printed (and written to --output-file): text, a JSON document, or one JSON line per row."""
    from vlm_sweep.inference.generate import format_answer

    if args.input_jsonl:
        return "".join(json.dumps({**row, "output": format_answer(a, args.output_format)}) + "\n"
                       for row, a in zip(rows, answers))
    if args.output_format == "json":
        return json.dumps(format_answer(answers[0], "json"), indent=2, ensure_ascii=False) + "\n"
    return answers[0] + "\n"


def _main(argv: Optional[List[str]]) -> int:
    """Read the inputs (media errors before the model loads), load, check, generate, print."""
    args = build_parser("python -m vlm_sweep.cli.generate", __doc__, GENERATE).parse_args(argv)
    from vlm_sweep.console import silence_known_noise

    silence_known_noise()
    rows, conversations = _inputs(args)

    import torch

    from vlm_sweep.inference.generate import check_video_support, generate_for_loaded
    from vlm_sweep.inference.load import load_for_inference

    torch.manual_seed(args.seed)
    loaded = load_for_inference(args.checkpoint, dtype=args.dtype)
    check_video_support(loaded.family, rows, args.input_jsonl)
    answers = generate_for_loaded(loaded, conversations, sampling_config(args), args.batch_size)
    text = _render(args, rows, answers)
    if args.output_file:
        Path(args.output_file).write_text(text)
    sys.stdout.write(text)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point: a user error (missing image, unknown checkpoint, video for a family without) is one line, exit 2."""
    return run_command(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
