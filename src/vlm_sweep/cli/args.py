"""Every command-line flag of generate / evaluate / export, defined once.

Each command picks the flags it takes from ``FLAGS`` by name, so a flag has one spelling,
one alias set and one default everywhere. Old spellings stay as aliases
(``--checkpoint-path``, export's ``--output``). Decoding defaults come from
``inference.generate.SamplingConfig``, which the training loop's eval uses too.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Optional, Tuple

from vlm_sweep.inference.generate import DEFAULT_PROMPT, SamplingConfig

_SAMPLING = SamplingConfig()


@dataclass(frozen=True)
class Flag:
    """One flag: its names (the first is the documented one, the rest aliases) and argparse settings."""

    names: Tuple[str, ...]
    settings: Dict[str, Any] = field(default_factory=dict)


FLAGS: Dict[str, Flag] = {
    # What to load: every command.
    "checkpoint": Flag(("--checkpoint", "--checkpoint-path"), dict(
        metavar="PATH", help="run dir, checkpoints dir, step_<N> dir, model or export dir, or hub id")),
    "dtype": Flag(("--dtype",), dict(default=None, help="override the model dtype (float32, bfloat16, ...)")),
    # Decoding: generate and evaluate.
    "max_new_tokens": Flag(("--max-new-tokens",), dict(type=int, default=_SAMPLING.max_new_tokens,
                                                        help="answer length limit (default: %(default)s)")),
    "batch_size": Flag(("--batch-size",), dict(type=int, default=4,
                                               help="prompts per generate call (default: %(default)s)")),
    "do_sample": Flag(("--do-sample",), dict(action="store_true", help="sample instead of greedy decoding")),
    "temperature": Flag(("--temperature",), dict(type=float, default=_SAMPLING.temperature)),
    "top_p": Flag(("--top-p",), dict(type=float, default=_SAMPLING.top_p)),
    "top_k": Flag(("--top-k",), dict(type=int, default=_SAMPLING.top_k)),
    "seed": Flag(("--seed",), dict(type=int, default=0, help="torch seed (matters with --do-sample)")),
    # Inputs: generate.
    "prompt": Flag(("--prompt",), dict(default=DEFAULT_PROMPT)),
    "image": Flag(("--image",), dict(action="append", default=[], help="image path (repeat for several)")),
    "video": Flag(("--video",), dict(default=None, help="video path (decoded with PyAV)")),
    "num_frames": Flag(("--num-frames",), dict(type=int, default=10, help="frames sampled uniformly from --video")),
    "input_jsonl": Flag(("--input-jsonl",), dict(default=None, help="batch mode: rows of {image, prompt[, video]}")),
    # Data: evaluate (the data set itself is chosen with Hydra overrides such as dataset.split=test).
    "max_samples": Flag(("--max-samples",), dict(type=int, default=None, help="score only the first N records")),
    "compare_base": Flag(("--compare-base",), dict(action="store_true", help="also score the untrained base model")),
    "examples": Flag(("--examples",), dict(type=int, default=0, metavar="N", help=(
        "print the first N records' truth and answer side by side and save their images (default: %(default)s)"))),
    # Outputs.
    "output_format": Flag(("--output-format",), dict(choices=["text", "json"], default="text",
                                                      help="json: parse CORD tag sequences with token2json")),
    "output_file": Flag(("--output-file",), dict(default=None, help="also write the output to this file")),
    "output_dir": Flag(("--output-dir", "--output"), dict(default=None, metavar="DIR", help="directory to write")),
    # Export.
    "merge_lora": Flag(("--merge-lora",), dict(action="store_true", help="merge LoRA into the base weights")),
    "max_shard_size": Flag(("--max-shard-size",), dict(default="5GB")),
}

GENERATE = ("checkpoint", "prompt", "image", "video", "num_frames", "input_jsonl", "batch_size", "max_new_tokens",
            "do_sample", "temperature", "top_p", "top_k", "seed", "output_format", "output_file", "dtype")
EVALUATE = ("checkpoint", "max_samples", "batch_size", "max_new_tokens", "output_dir", "compare_base", "examples",
            "dtype")
EXPORT = ("checkpoint", "output_dir", "merge_lora", "max_shard_size")


def build_parser(prog: str, description: str, flags: Iterable[str], required: Iterable[str] = ("checkpoint",),
                 epilog: Optional[str] = None) -> argparse.ArgumentParser:
    """A parser with ``flags`` (names in ``FLAGS``); those in ``required`` must be given."""
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    needed = set(required)
    for name in flags:
        flag = FLAGS[name]
        settings = dict(flag.settings, dest=name)
        if name in needed:
            settings.pop("default", None)
            settings["required"] = True
        parser.add_argument(*flag.names, **settings)
    return parser


def sampling_config(args: argparse.Namespace) -> SamplingConfig:
    """The decoding settings a command's flags ask for (greedy unless --do-sample)."""
    return SamplingConfig(max_new_tokens=args.max_new_tokens, do_sample=getattr(args, "do_sample", False),
                          temperature=getattr(args, "temperature", _SAMPLING.temperature),
                          top_p=getattr(args, "top_p", _SAMPLING.top_p), top_k=getattr(args, "top_k", _SAMPLING.top_k))

