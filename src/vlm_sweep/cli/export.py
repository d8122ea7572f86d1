"""Export a checkpoint as a plain Hugging Face model dir.

    python -m vlm_sweep.cli.export --checkpoint <run|checkpoints|step dir> --output-dir <dir> [--merge-lora]

With --merge-lora (or for a full fine-tune) the output is a full model (safetensors shards,
config, generation config, processor with chat template) that loads with plain
``AutoModelForImageTextToText`` / ``AutoProcessor``. Without it, an adapter checkpoint is
exported as a PEFT adapter whose adapter_config.json names the base model.
"""

from __future__ import annotations

import sys
from typing import List, Optional

from vlm_sweep.cli.args import EXPORT, build_parser
from vlm_sweep.cli.user_errors import run_command


def _main(argv: Optional[List[str]]) -> int:
    """Parse the flags, export, say where."""
    parser = build_parser("python -m vlm_sweep.cli.export", __doc__, EXPORT, required=("checkpoint", "output_dir"))
    args = parser.parse_args(argv)
    from vlm_sweep.console import silence_known_noise
    from vlm_sweep.inference.export import export_checkpoint

    silence_known_noise()
    try:
        out = export_checkpoint(args.checkpoint, args.output_dir, args.merge_lora, args.max_shard_size)
    except OSError as err:  # a missing checkpoint dir, an unwritable output: the file and the reason
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported to {out}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point: a user error (missing or incomplete checkpoint) is one line, exit 2."""
    return run_command(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
