"""Export a checkpoint as a plain Hugging Face model dir.

    python -m vlm_sweep.export --checkpoint <run|checkpoints|step dir> --output <dir> [--merge-lora]

With --merge-lora (or for a full fine-tune) the output is a full model (safetensors shards,
config, generation config, processor with chat template) that loads with plain
``AutoModelForImageTextToText`` / ``AutoProcessor``. Without it, an adapter checkpoint is
exported as a PEFT adapter whose adapter_config.json names the base model.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import List, Optional


def export_checkpoint(checkpoint: str, output: str, merge_lora: bool = False,
                      max_shard_size: str = "5GB") -> Path:
    """Write the export; returns the output dir. Written to a temp dir first, then renamed."""
    from vlm_sweep.inference import find_model_dir, load_for_inference

    out = Path(output)
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model_dir, _ = find_model_dir(checkpoint)
    is_adapter = (model_dir / "adapter_config.json").exists()
    if is_adapter and not merge_lora:
        shutil.copytree(model_dir, tmp)
        adapter = json.loads((tmp / "adapter_config.json").read_text())
        (tmp / "BASE_MODEL").write_text(adapter["base_model_name_or_path"] + "\n")
    else:
        loaded = load_for_inference(checkpoint, merge_lora=True)
        loaded.model.save_pretrained(tmp, max_shard_size=max_shard_size)
        loaded.processor.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlm_sweep.export", description=__doc__.split("\n")[1])
    parser.add_argument("--checkpoint", required=True, help="run dir, checkpoints dir or step_<N> dir")
    parser.add_argument("--output", required=True, help="directory to write")
    parser.add_argument("--merge-lora", action="store_true", help="merge LoRA into the base weights")
    parser.add_argument("--max-shard-size", default="5GB")
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.checkpoint, args.output, args.merge_lora, args.max_shard_size)
    except (FileNotFoundError, OSError, RuntimeError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
